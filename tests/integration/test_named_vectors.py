"""Several named vectors per point ([[mappings.vectors]]): each vector has its own embedder
and text, is embedded only when its own text changes, and is searched by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import App, load, write_config
from vectorsync.embed.hash import HashEmbedder
from vectorsync.engine import Engine, build_sink
from vectorsync.errors import ConfigError
from vectorsync.model import point_id
from vectorsync.sinks.base import CollectionSpec, VectorSpec, split_vector

VECTORS = """
[[mappings.vectors]]
name = "body"
embedder = "default"
text = "{{ body }}"
[[mappings.vectors]]
name = "title"
embedder = "small"
text = "{{ title }}"
"""

SINKS = {
    "qdrant-edge": 'kind = "qdrant-edge"\npath = ".vectorsync/qdrant"',
    "qdrant": 'kind = "qdrant"\npath = ".vectorsync/qdrant-local"',
}
LAYOUT = (
    VectorSpec(name="body", dimension=384, distance="cosine"),
    VectorSpec(name="title", dimension=32, distance="cosine"),
)


def _config(workdir: Path, sink: str = SINKS["qdrant-edge"]) -> Path:
    cfg = write_config(workdir, sink=sink, extra_mapping=VECTORS)
    text = cfg.read_text().replace('text = "{{ title }}\\n{{ body }}"\n', "", 1)
    text = text.replace(
        "[[mappings]]", '[embedders.small]\nkind = "hash"\ndimension = 32\n[[mappings]]', 1
    )
    cfg.write_text(text)
    return cfg


async def _points(cfg: Path) -> dict[str, dict[str, list[float]]]:
    """Each point's named vectors, read straight from the sink."""
    config = load(cfg)
    sink = build_sink("vectors", config.sinks["vectors"], config)
    await sink.open()
    try:
        spec = CollectionSpec(name="articles", dimension=416, distance="cosine", vectors=LAYOUT)
        await sink.ensure_collection(spec)
        found = {r.id: r.vector async for r in sink.scroll("articles", with_vectors=True)}
    finally:
        await sink.close()
    return {pid: split_vector(LAYOUT, v or []) for pid, v in found.items()}


@pytest.mark.parametrize("sink", sorted(SINKS))
async def test_each_vector_is_embedded_only_when_its_own_text_changes(
    workdir: Path, app: App, sink: str
) -> None:
    for k in range(1, 11):
        app.insert(k, title=f"title {k}", body=f"the body of record {k}")
    cfg = _config(workdir, SINKS[sink])
    config = load(cfg)
    default, small = HashEmbedder("default"), HashEmbedder("small", dimension=32)
    embedders = {"default": default, "small": small}
    async with Engine.open(config, embedders=embedders) as engine:
        await engine.run(once=True)
    assert (default.texts_embedded, small.texts_embedded) == (10, 10)
    points = await _points(cfg)
    assert len(points) == 10
    p3 = points[point_id("articles", 3)]
    assert p3["body"] == pytest.approx(default.vector("the body of record 3"), abs=1e-5)
    assert p3["title"] == pytest.approx(small.vector("title 3"), abs=1e-5)

    app.update(3, title="a new title")  # a title-only edit
    app.update(4, body="a new body")  # a body-only edit
    app.update(5, author="bob")  # metadata only
    async with Engine.open(config, embedders=embedders) as engine:
        await engine.run(once=True)
        embedded = (default.texts_embedded, small.texts_embedded)
        hits = await engine.search("articles", "a new title", 1, vector="title")
        by_body = await engine.search("articles", "a new body", 1)  # the first vector
        for mode in ("full", "prove", "quick", "sample"):
            report = await engine.check("articles", mode=mode)
            assert report.consistent, (mode, report.counts)
    assert embedded == (11, 11)  # record 3's title, record 4's body
    points = await _points(cfg)
    p3, p4 = points[point_id("articles", 3)], points[point_id("articles", 4)]
    assert p3["title"] == pytest.approx(small.vector("a new title"), abs=1e-5)
    assert p3["body"] == pytest.approx(default.vector("the body of record 3"), abs=1e-5)
    assert p4["body"] == pytest.approx(default.vector("a new body"), abs=1e-5)
    assert p4["title"] == pytest.approx(small.vector("title 4"), abs=1e-5)
    assert hits[0].record.payload["_vs_key"] == 3
    assert by_body[0].record.payload["_vs_key"] == 4


async def test_search_shows_the_text_of_the_vector_searched(workdir: Path, app: App) -> None:
    from vectorsync.search import find

    app.insert(1, title="gzip files", body="compress data into an archive")
    config = load(_config(workdir))
    embedders = {"default": HashEmbedder("default"), "small": HashEmbedder("small", dimension=32)}
    async with Engine.open(config, embedders=embedders) as engine:
        await engine.run(once=True)
        [title_hit] = await find(engine, "articles", "gzip", 1, None, "title")
        [body_hit] = await find(engine, "articles", "archive", 1, None)
        with pytest.raises(ConfigError, match=r"no vector 'summary' \(vectors: body, title\)"):
            await engine.search("articles", "x", vector="summary")
    assert title_hit["text"] == "gzip files"
    assert body_hit["text"] == "compress data into an archive"


async def test_a_model_change_of_one_vector_embeds_only_that_vector_again(
    workdir: Path, app: App
) -> None:
    for k in range(1, 6):
        app.insert(k)
    cfg = _config(workdir)
    default = HashEmbedder("default")
    async with Engine.open(
        load(cfg), embedders={"default": default, "small": HashEmbedder("small", dimension=32)}
    ) as engine:
        await engine.run(once=True)
    bigger = HashEmbedder("small", dimension=48)  # the title's model changes
    cfg.write_text(cfg.read_text().replace("dimension = 32", "dimension = 48"))
    async with Engine.open(load(cfg), embedders={"default": default, "small": bigger}) as engine:
        await engine.run(once=True)  # builds the next index version and swaps to it
        embedded = (default.texts_embedded, bigger.texts_embedded)
        hits = await engine.search("articles", "title 2", 1, vector="title")
        report = await engine.check("articles", mode="full")
    assert embedded == (5, 5)  # the titles again; the bodies from the cache
    assert hits[0].record.payload["_vs_key"] == 2
    assert report.consistent


def test_named_vectors_are_refused_where_the_sink_has_one_vector_per_point(
    workdir: Path,
) -> None:
    cfg = _config(workdir, 'kind = "chroma"\npath = ".vectorsync/chroma"')
    with pytest.raises(ConfigError, match="named vectors need a Qdrant sink"):
        load(cfg)


def test_a_mapping_with_vectors_sets_no_text_of_its_own(workdir: Path) -> None:
    cfg = write_config(workdir, extra_mapping=VECTORS)
    with pytest.raises(ConfigError, match="sets text and embedder per vector"):
        load(cfg)


HYBRID = (
    VECTORS
    + """
[[mappings.vectors]]
name = "terms"
embedder = "terms"
text = "{{ title }} {{ body }}"
"""
)


@pytest.mark.parametrize("sink", sorted(SINKS))
async def test_a_sparse_vector_finds_rare_terms_and_fuses_with_the_dense_one(
    workdir: Path, app: App, sink: str
) -> None:
    from vectorsync.embed.sparse import SparseEncoder

    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    for k, word in enumerate(words, 1):
        app.insert(k, title=f"note {k}", body=f"a common body about {word} and more")
    cfg = write_config(workdir, sink=SINKS[sink], extra_mapping=HYBRID)
    text = cfg.read_text().replace('text = "{{ title }}\\n{{ body }}"\n', "", 1)
    extra = '[embedders.small]\nkind = "hash"\ndimension = 32\n[embedders.terms]\nkind = "sparse"\n'
    cfg.write_text(text.replace("[[mappings]]", extra + "[[mappings]]", 1))
    config = load(cfg)
    terms = SparseEncoder("terms")
    embedders = {
        "default": HashEmbedder("default"),
        "small": HashEmbedder("small", dimension=32),
        "terms": terms,
    }
    async with Engine.open(config, embedders=embedders) as engine:
        await engine.run(once=True)
        # a word only one record holds: IDF (computed by the sink) makes it count most
        by_terms = await engine.search("articles", "foxtrot", 3, vector="terms")
        hybrid = await engine.search("articles", "foxtrot", 3, hybrid=True)
        app.update(6, body="a common body about zulu and more")  # the sparse vector follows
        await engine.run(once=True)
        moved = await engine.search("articles", "zulu", 1, vector="terms")
        gone = await engine.search("articles", "foxtrot", 1, vector="terms")
        report = await engine.check("articles", mode="full")
        with pytest.raises(ConfigError, match="hybrid search needs a sparse vector"):
            await engine.search("articles", "x", hybrid=True, vector="terms")
    assert by_terms[0].record.payload["_vs_key"] == 6
    assert 6 in [h.record.payload["_vs_key"] for h in hybrid]
    assert moved[0].record.payload["_vs_key"] == 6
    assert all(h.record.payload["_vs_key"] != 6 for h in gone)  # no record has it now
    assert report.consistent
    assert terms.texts_embedded == 9  # each write of a record tokenizes its text once


def test_a_sparse_embedder_cannot_be_the_first_vector(workdir: Path) -> None:
    cfg = write_config(workdir, embedder='kind = "sparse"')
    with pytest.raises(ConfigError, match="makes sparse vectors and cannot be its embedder"):
        load(cfg)
