"""Chunking: a document row becomes many chunk points, an edit re-embeds only the chunks it
touched, and every guarantee holds chunk by chunk — against the real engines (SQLite,
PostgreSQL logical and outbox, FalkorDB for the suites marked all_sources; qdrant-edge, and
Chroma and pgvector for those marked all_sinks)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import App, check, load, read_sink, sync_once, write_config
from tests.integration.test_guarantees import (
    duplicated_and_shuffled_converge,
    random_changes_converge,
)
from vectorsync.chunking import Chunker
from vectorsync.config import ChunkingConfig
from vectorsync.embed.hash import HashEmbedder
from vectorsync.embed.sentence_transformers import bundled_model_path
from vectorsync.engine import Engine
from vectorsync.model import Point
from vectorsync.sinks.qdrant_edge import QdrantEdgeSink

# small chunks, so the random test rows (a title and six words) make two to four chunks each
SMALL = '[mappings.chunking]\nunit = "chars"\nsize = 24\nstore_text = true'
# one chunk per paragraph of the document below: a paragraph holds ~250 characters
PARAGRAPHS = '[mappings.chunking]\nunit = "chars"\nsize = 300'


def _paragraph(i: int, word: str = "word") -> str:
    return f"Paragraph {i}. " + " ".join(f"{word}{i}x{j}" for j in range(24))


def _document(paragraphs: list[str]) -> str:
    return "\n\n".join(paragraphs)


@contextlib.asynccontextmanager
async def _sink(workdir: Path, collection: str = "articles") -> AsyncIterator[QdrantEdgeSink]:
    """The project's qdrant-edge folder opened directly (vectorsync is not running)."""
    sink = QdrantEdgeSink("direct", workdir / ".vectorsync" / "qdrant")
    await sink.open()
    try:
        await read_sink(sink, collection)  # opens the collection
        yield sink
    finally:
        await sink.close()


async def _points(
    workdir: Path, key: int | None = None, collection: str = "articles"
) -> dict[str, Any]:
    async with _sink(workdir, collection) as sink:
        points = await read_sink(sink, collection)
    return {pid: r for pid, r in points.items() if key is None or r.payload["_vs_key"] == key}


async def test_a_50_chunk_document_re_embeds_only_the_chunks_an_edit_touched(
    workdir: Path, app: App
) -> None:
    paragraphs = [_paragraph(i) for i in range(50)]
    app.insert(1, title="The document", body=_document(paragraphs))
    app.insert(2, body="a short neighbour")
    cfg = write_config(workdir, text="{{ body }}", extra_mapping=PARAGRAPHS)
    embedder = HashEmbedder("default")
    counts = await sync_once(cfg, embedder)
    assert counts["chunks"] == 51 and embedder.texts_embedded == 51
    assert len(await _points(workdir, 1)) == 50
    await check(cfg, app)

    def embedded_by(counts: dict[str, int]) -> int:
        return counts["embedded"]

    paragraphs[25] = _paragraph(25, word="edited")  # one paragraph in the middle
    app.update(1, body=_document(paragraphs))
    counts = await sync_once(cfg, embedder)
    assert embedded_by(counts) <= 2 and counts["upserted"] <= 2
    await check(cfg, app)

    paragraphs.insert(0, _paragraph(99, word="new"))  # a paragraph at the top
    app.update(1, body=_document(paragraphs))
    counts = await sync_once(cfg, embedder)
    assert embedded_by(counts) <= 2 and counts["upserted"] <= 2
    assert len(await _points(workdir, 1)) == 51
    await check(cfg, app)

    before = await _points(workdir, 1)
    keep = len(paragraphs) - len(paragraphs) // 3
    past_end = {pid for pid, r in before.items() if r.payload["chunk_index"] >= keep}
    app.update(1, body=_document(paragraphs[:keep]))  # the last third deleted
    counts = await sync_once(cfg, embedder)
    assert counts["embedded"] == 0 and counts["chunks_deleted"] == len(past_end) == 17
    after = await _points(workdir, 1)
    assert set(after) == set(before) - past_end
    await check(cfg, app)

    n = len(after)
    app.update(1, author="someone else")  # metadata only
    counts = await sync_once(cfg, embedder)
    assert counts["payload_only"] == n and counts["embedded"] == counts["upserted"] == 0
    assert {r.payload["author"] for r in (await _points(workdir, 1)).values()} == {"someone else"}
    await check(cfg, app)

    app.delete(1)
    counts = await sync_once(cfg, embedder)
    assert counts["chunks_deleted"] == n and counts["embedded"] == 0
    assert await _points(workdir, 1) == {}
    assert len(await _points(workdir)) == 1  # the neighbour's
    await check(cfg, app)


def test_chunks_are_sized_in_the_embedders_own_tokens() -> None:
    from tokenizers import Tokenizer

    tokenizer = bundled_model_path() / "tokenizer.json"
    chunker = Chunker(ChunkingConfig(size=64, overlap=8), tokenizer)
    text = _document([_paragraph(i) for i in range(40)])
    chunks = chunker.split(text)
    tok = Tokenizer.from_file(str(tokenizer))
    tok.no_truncation()
    tok.no_padding()
    counts = [len(tok.encode(c.text, add_special_tokens=False).ids) for c in chunks]
    assert len(chunks) > 10 and max(counts) <= 64
    assert all(text[c.start : c.end] == c.text for c in chunks)
    # the bundled tokenizer.json truncates at 128 tokens unless told not to: a chunker that
    # forgot would see every paragraph as short and cut nothing
    assert sum(counts) > 128 * 5


@pytest.mark.all_sources
@pytest.mark.all_sinks
@pytest.mark.parametrize("seed", [1, 2])
async def test_random_changes_converge_chunk_by_chunk(workdir: Path, app: App, seed: int) -> None:
    await random_changes_converge(workdir, app, seed, extra_mapping=SMALL)


@pytest.mark.all_sources
@pytest.mark.all_sinks
async def test_duplicated_and_shuffled_changes_converge_chunk_by_chunk(
    workdir: Path, app: App
) -> None:
    await duplicated_and_shuffled_converge(workdir, app, extra_mapping=SMALL)


@pytest.mark.parametrize("mode", ["full", "sample", "quick"])
async def test_check_finds_a_deleted_a_foreign_and_a_stale_chunk_and_repair_fixes_them(
    workdir: Path, app: App, mode: str
) -> None:
    for k in range(1, 21):
        app.insert(k, body=" ".join(f"word{k}x{j}" for j in range(12)))
    cfg = write_config(workdir, extra_mapping=SMALL)
    await sync_once(cfg)
    points = await _points(workdir)
    by_key: dict[int, list[Any]] = {}
    for r in points.values():
        by_key.setdefault(r.payload["_vs_key"], []).append(r)
    deleted = by_key[3][1]  # a chunk point of record 3 deleted behind vectorsync's back
    stale = by_key[5][0]  # a chunk point of record 5 holding another text
    foreign = "00000000-0000-4000-8000-000000000001"  # a point vectorsync never wrote
    async with _sink(workdir) as sink:
        await sink.delete("articles", [deleted.id])
        await sink.upsert(
            "articles",
            [
                Point(
                    id=stale.id,
                    vector=[0.5] * 384,
                    payload={
                        **stale.payload,
                        "_vs_text_hash": "0" * 32,
                        "chunk_text": "old text",
                    },
                ),
                Point(id=foreign, vector=[0.5] * 384, payload={**stale.payload}),
            ],
        )
    async with Engine.open(load(cfg)) as engine:
        if mode == "sample":
            result = await engine.check_and_repair("articles", mode=mode, sample_size=20, seed=1)
        else:
            result = await engine.check_and_repair("articles", mode=mode)
        before = result["before"]
        assert not before["consistent"]
        keys = before["keys"]
        if mode == "quick":  # existence only: the deleted and the foreign chunk
            assert keys["missing"] == [3] and keys["orphaned"] == [foreign]
        else:
            assert keys["missing"] == [3] and keys["stale"] == [5]
            # a sample compares the records it drew: a point of no record is for full
            assert keys["orphaned"] == ([] if mode == "sample" else [foreign])
        result = await engine.check_and_repair("articles", mode=mode, repair=True)
        assert result["after"]["consistent"], result["after"]
    if mode != "full":  # what quick (a stale text) and sample (a point of no record) miss
        async with Engine.open(load(cfg)) as engine:
            result = await engine.check_and_repair("articles", mode="full", repair=True)
            left = result["before"]["keys"]
            assert left["stale"] == ([5] if mode == "quick" else [])
            assert left["orphaned"] == ([foreign] if mode == "sample" else [])
            assert left["missing"] == []
    await check(cfg, app)


async def test_prove_counts_chunk_points(workdir: Path, app: App) -> None:
    for k in range(1, 11):
        app.insert(k, body=" ".join(f"word{k}x{j}" for j in range(12)))
    cfg = write_config(workdir, extra_mapping=SMALL)
    await sync_once(cfg)
    points = await _points(workdir)
    async with Engine.open(load(cfg)) as engine:
        proof = await engine.check_and_repair("articles", mode="prove")
        assert proof["before"]["consistent"]
        assert proof["before"]["sink_points"] == proof["before"]["synced_points"] == len(points)
        assert len(points) > 20
    async with _sink(workdir) as sink:
        await sink.delete("articles", [next(iter(points))])
    async with Engine.open(load(cfg)) as engine:
        proof = await engine.check_and_repair("articles", mode="prove")
        assert not proof["before"]["consistent"]
        assert not proof["before"]["sink_count_matches"]


async def test_a_chunking_change_builds_a_new_index_version(workdir: Path, app: App) -> None:
    for k in range(1, 11):
        app.insert(k, body=" ".join(f"word{k}x{j}" for j in range(12)))
    cfg = write_config(workdir, extra_mapping=SMALL)
    await sync_once(cfg)
    cfg = write_config(workdir, extra_mapping=SMALL.replace("size = 24", "size = 40"))
    await sync_once(cfg)
    async with Engine.open(load(cfg)) as engine:
        states = {v["version"]: v["state"] for v in await engine.indexes("articles")}
        assert states == {1: "previous", 2: "live"}
        hits = await engine.search("articles", "word3x4", limit=3)
        assert hits and "chunk_index" in hits[0].record.payload
    await check(cfg, app)


async def test_metrics_show_chunks_per_record_and_search_names_the_chunk(
    workdir: Path, app: App
) -> None:
    from tests.integration.test_http import metric
    from vectorsync.metrics import prometheus_text
    from vectorsync.search import find

    app.insert(1, body=" ".join(f"alpha{j}" for j in range(12)))
    app.insert(2, body=" ".join(f"beta{j}" for j in range(12)))
    cfg = write_config(workdir, text="{{ body }}", extra_mapping=SMALL)
    async with Engine.open(load(cfg)) as engine:
        counts = (await engine.run(once=True)).counts
        text = (await prometheus_text(engine)).decode()
        hits = await find(engine, "articles", "beta3 beta4", 1, None)
    assert metric(text, "vectorsync_chunks_total", mapping="articles") == counts["chunks"]
    per_record = metric(text, "vectorsync_chunks_per_record", mapping="articles")
    assert per_record == counts["chunks"] / 2 > 2
    [hit] = hits
    assert hit["key"] == 2 and hit["chunk"]["count"] == counts["chunks"] // 2
    start, end = hit["chunk"]["start"], hit["chunk"]["end"]
    body = " ".join(f"beta{j}" for j in range(12))
    assert hit["text"] == body[start:end] and "beta" in hit["text"]


async def test_a_related_record_change_fans_out_to_every_chunk_of_its_records(
    workdir: Path,
) -> None:
    import sqlite3

    db = sqlite3.connect(workdir / "app.db", isolation_level=None)
    db.execute("CREATE TABLE authors (id INTEGER PRIMARY KEY, name TEXT)")
    db.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, author_id INTEGER, body TEXT)")
    db.execute("INSERT INTO authors VALUES (1, 'ann'), (2, 'bob')")
    for d in range(1, 7):
        body = " ".join(f"doc{d}w{j}" for j in range(20))
        db.execute("INSERT INTO docs VALUES (?, ?, ?)", (d, 1 + d % 2, body))
    (workdir / "vectorsync.toml").write_text(
        """
[state]
url = "sqlite:///.vectorsync/state.db"
[sources.app]
kind = "sqlite"
path = "app.db"
[sinks.vectors]
kind = "qdrant-edge"
path = ".vectorsync/qdrant"
[embedders.default]
kind = "hash"
[[mappings]]
name = "docs"
source = "app"
table = "docs"
text = "{{ body }}"
payload = ["author"]
sink = "vectors"
[mappings.chunking]
unit = "chars"
size = 40
[[mappings.related]]
name = "writer"
table = "authors"
on = { id = "author_id" }
fields = { author = "name" }
"""
    )
    embedder = HashEmbedder("default")
    counts = await sync_once(workdir / "vectorsync.toml", embedder)
    sink_points = await _points(workdir, collection="docs")
    bob = [r for r in sink_points.values() if r.payload["author"] == "bob"]
    assert counts["chunks"] == len(sink_points) and len(bob) > 3 * 2
    db.execute("UPDATE authors SET name = 'robert' WHERE id = 2")
    before = embedder.texts_embedded
    counts = await sync_once(workdir / "vectorsync.toml", embedder)
    assert embedder.texts_embedded == before  # the author is payload, not text
    assert counts["payload_only"] == len(bob)  # every chunk of bob's three documents
    after = await _points(workdir, collection="docs")
    assert set(after) == set(sink_points)
    assert sorted(r.payload["author"] for r in after.values()) == sorted(
        ["ann"] * (len(after) - len(bob)) + ["robert"] * len(bob)
    )
    db.close()
