"""Conflicts on vectors and payloads together: for each policy (source_wins, latest_wins,
merge, keep_both) and two Qdrant sink kinds, someone else edits payload fields and vectors
in the sink while the source changes the same and other records; the result is the one
docs/conflicts.md gives, each conflict is logged once, and nothing else is touched."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import App, load, write_config
from vectorsync.config import Config
from vectorsync.conflicts import FOREIGN, layout_for
from vectorsync.embed.hash import HashEmbedder
from vectorsync.engine import Engine, build_sink
from vectorsync.errors import ConfigError
from vectorsync.model import Point, SinkRecord, point_id
from vectorsync.sinks.base import CollectionSpec, NamedSearch, Sink

SINKS = {
    "qdrant-edge": 'kind = "qdrant-edge"\npath = ".vectorsync/qdrant"',
    "qdrant": 'kind = "qdrant"\npath = ".vectorsync/qdrant-local"',
}
FIELDS = ("author", "tags", "published")
EMBEDDER = HashEmbedder()
POLICIES = {
    "source_wins": "",
    "latest_wins": 'conflicts = "latest_wins"\nconflict_timestamp = "published"',
    "merge": 'conflicts = "merge"',
    "merge-tie-sink": 'conflicts = "merge"\nmerge_tie = "sink"',
    "keep_both": 'conflicts = "keep_both"',
}
ANN = {"author": "ann", "tags": "a", "published": 2020}
# per policy: key → (payload fields, main vector, foreign vector), and key → (resolution,
# fields logged); vectors: v0 as first written, vs someone else's, vn of the source's new text
EXPECTED: dict[str, tuple[dict[int, tuple[dict[str, Any], str, str | None]], dict[str, Any]]] = {
    "source_wins": (  # nothing read while syncing: what a write does not set stays
        {
            1: ({**ANN, "tags": "t1", "published": 2099}, "vs", None),
            2: (ANN, "vn", None),
            3: ({**ANN, "author": "src-carl"}, "vs", None),
            5: ({**ANN, "tags": "curated", "published": 2021}, "v0", None),
        },
        {},
    ),
    "latest_wins": (
        {
            1: ({**ANN, "published": 2099}, "vs", None),  # the sink is newer: all its own
            2: (ANN, "vn", None),
            3: ({**ANN, "author": "src-carl"}, "v0", None),
            5: ({**ANN, "published": 2021}, "v0", None),
        },
        {
            "1": ("sink_kept", ["published", "tags", "vector"]),
            "2": ("source_written", ["vector"]),
            "3": ("source_written", ["author", "vector"]),
            "5": ("source_written", ["tags"]),
        },
    ),
    "merge": (
        {
            1: ({**ANN, "tags": "t1", "published": 2099}, "vs", None),
            2: (ANN, "vn", None),  # both changed the vector: the tie goes to the source
            3: ({**ANN, "author": "src-carl"}, "vs", None),
            5: ({**ANN, "tags": "curated", "published": 2021}, "v0", None),
        },
        {
            "1": ("sink_kept", ["published", "vector"]),
            "2": ("source_written", ["vector"]),
            "3": ("merged", ["author", "vector"]),
            "5": ("sink_kept", ["tags"]),
        },
    ),
    "merge-tie-sink": (
        {
            1: ({**ANN, "tags": "t1", "published": 2099}, "vs", None),
            2: (ANN, "vs", None),
            3: ({**ANN, "author": "sink-bob"}, "vs", None),
            5: ({**ANN, "tags": "curated", "published": 2021}, "v0", None),
        },
        {
            "1": ("sink_kept", ["published", "vector"]),
            "2": ("sink_kept", ["vector"]),
            "3": ("sink_kept", ["author", "vector"]),
            "5": ("sink_kept", ["tags"]),
        },
    ),
    "keep_both": (  # payload fields as source_wins, but read: every edit is overwritten
        {
            1: ({**ANN, "tags": "t1"}, "v0", "vs"),
            2: (ANN, "vn", "vs"),
            3: ({**ANN, "author": "src-carl"}, "v0", "vs"),
            5: ({**ANN, "published": 2021}, "v0", None),
        },
        {
            "1": ("kept_both", ["published", "vector"]),
            "2": ("kept_both", ["vector"]),
            "3": ("kept_both", ["author", "vector"]),
            "5": ("source_written", ["tags"]),
        },
    ),
}


def _config(workdir: Path, sink: str, policy: str) -> Config:
    return load(write_config(workdir, sink=SINKS[sink], extra_mapping=POLICIES[policy]))


async def _open(config: Config) -> Sink:
    sink = build_sink("vectors", config.sinks["vectors"], config)
    await sink.open()
    spec = CollectionSpec(
        name="articles",
        dimension=EMBEDDER.dimension,
        distance="cosine",
        vectors=layout_for(config.mappings[0], EMBEDDER),
    )
    await sink.ensure_collection(spec)
    return sink


async def _points(config: Config) -> dict[int, SinkRecord]:
    sink = await _open(config)
    try:
        found = [r async for r in sink.scroll("articles", with_vectors=True)]
    finally:
        await sink.close()
    return {r.payload["_vs_key"]: r for r in found}


async def _edit(config: Config, edits: dict[int, dict[str, Any]], vectors: set[int]) -> None:
    """Someone else rewrites points in the sink directly: payload fields, vectors."""
    sink = await _open(config)
    try:
        ids = {point_id("articles", k): k for k in {*edits, *vectors}}
        held = {r.id: r for r in await sink.retrieve("articles", list(ids), with_vectors=True)}
        points = []
        for pid, k in ids.items():
            rec = held[pid]
            assert rec.vector is not None
            vector = _theirs(k) if k in vectors else rec.vector
            payload = {**rec.payload, **edits.get(k, {})}
            points.append(Point(id=pid, vector=vector, payload=payload, extra=rec.extra))
        await sink.upsert("articles", points)
    finally:
        await sink.close()


def _theirs(key: int) -> list[float]:
    return EMBEDDER.vector(f"a vector someone else made for {key}")


def _same(a: Sequence[float] | None, b: Sequence[float]) -> bool:
    assert a is not None
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.hypot(*a) * math.hypot(*b)) > 0.9999


class _Counted:
    """The sink's reads while syncing, counted."""

    def __init__(self, sink: Sink) -> None:
        self.reads: list[str] = []
        self.writing = False  # a sink's own read inside a payload update (qdrant) is no extra
        for name in ("retrieve", "scroll", "count", "search"):
            original = getattr(sink, name)
            setattr(sink, name, self._counting(name, original))
        update = sink.update_payloads

        async def update_payloads(*args: Any, **kwargs: Any) -> Any:
            self.writing = True
            try:
                return await update(*args, **kwargs)
            finally:
                self.writing = False

        sink.update_payloads = update_payloads  # type: ignore[method-assign]
        self.sink = sink

    def _counting(self, name: str, original: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if not self.writing:
                self.reads.append(f"{name}(vectors={bool(kwargs.get('with_vectors'))})")
            return original(*args, **kwargs)

        return call


async def _sync(config: Config) -> tuple[dict[str, int], list[str]]:
    counted = _Counted(build_sink("vectors", config.sinks["vectors"], config))
    sinks = {"vectors": counted.sink}
    async with Engine.open(config, sinks=sinks, embedders={"default": EMBEDDER}) as engine:
        result = await engine.run(once=True)
    return result.counts, counted.reads


@pytest.mark.parametrize("sink", sorted(SINKS))
@pytest.mark.parametrize("policy", sorted(POLICIES))
async def test_each_policy_resolves_payload_and_vector_edits_as_documented(
    workdir: Path, app: App, sink: str, policy: str
) -> None:
    for k in range(1, 7):
        app.insert(k)
    config = _config(workdir, sink, policy)
    await _sync(config)
    before = await _points(config)
    await _edit(
        config,
        {1: {"published": 2099}, 3: {"author": "sink-bob"}, 5: {"tags": "curated"}},
        vectors={1, 2, 3},
    )
    app.update(1, tags="t1")  # the sink changed the vector and another field
    app.update(2, body="a new body for two")  # both changed the vector
    app.update(3, author="src-carl")  # both changed author; only the sink the vector
    app.update(4, body="a new body for four")  # the source alone
    app.update(5, published=2021)  # the sink changed another field
    _, reads = await _sync(config)  # record 6: changed by nobody

    if policy == "source_wins":
        assert reads == []  # the default policy reads nothing from the sink while syncing
    else:
        assert reads == ["retrieve(vectors=True)"]  # one read per batch, vectors with it
    points = await _points(config)
    wanted, logged = EXPECTED[policy]
    vectors = {
        "v0": lambda k: before[k].vector,
        "vs": _theirs,
        "vn": lambda k: EMBEDDER.vector(f"title {k} a new body for {['two', 'four'][k // 4]}"),
    }
    for k, (fields, main, foreign) in {**wanted, 4: (ANN, "vn", None)}.items():
        p = points[k]
        assert {f: p.payload.get(f) for f in FIELDS} == fields, k
        assert _same(p.vector, vectors[main](k)), (k, main)
        if foreign is None:
            assert FOREIGN not in p.extra, k
        else:
            assert _same(p.extra[FOREIGN], vectors[foreign](k)), k
    untouched = points[6]  # nothing else is touched
    assert untouched.payload == before[6].payload and untouched.extra == {}
    assert untouched.vector == before[6].vector

    async with Engine.open(config, embedders={"default": EMBEDDER}) as engine:
        got = await engine.state.conflicts(mapping="articles")
        assert len(got) == len(logged)  # each conflict logged once
        assert {c["key"]: (c["resolution"], sorted(c["fields"])) for c in got} == {
            k: (r, f) for k, (r, f) in logged.items()
        }
        report = await engine.check("articles", mode="full")
        if policy != "source_wins":
            assert report.consistent, report.drift  # kept values and vectors are no drift
            assert len(await engine.state.conflicts(mapping="articles")) == len(logged)
    counts, _ = await _sync(config)  # settled: nothing more is written
    assert counts.get("payload_only", 0) == counts.get("upserted", 0) == 0
    after = await _points(config)
    assert {k: (p.payload, p.extra) for k, p in after.items()} == {
        k: (p.payload, p.extra) for k, p in points.items()
    }


@pytest.mark.parametrize("sink", sorted(SINKS))
async def test_keep_both_searches_the_sources_vector_and_keeps_the_foreign_one(
    workdir: Path, app: App, sink: str
) -> None:
    for k in range(1, 4):
        app.insert(k)
    config = _config(workdir, sink, "keep_both")
    await _sync(config)
    await _edit(config, {}, vectors={2})
    app.update(2, tags="b")
    await _sync(config)
    app.update(2, body="the source writes a new text")  # the foreign vector stays
    await _sync(config)
    s = await _open(config)
    try:
        own = EMBEDDER.vector("title 2 the source writes a new text")
        [hit] = await s.search("articles", own, limit=1)  # the default: the source's vector
        assert hit.record.payload["_vs_key"] == 2 and hit.score > 0.9999
        assert isinstance(s, NamedSearch)
        [theirs] = await s.search_vector("articles", FOREIGN, _theirs(2), limit=5)
        assert theirs.record.payload["_vs_key"] == 2  # only record 2 has a foreign vector
    finally:
        await s.close()
    async with Engine.open(config, embedders={"default": EMBEDDER}) as engine:
        assert (await engine.check("articles", mode="full")).consistent
        [c] = await engine.state.conflicts(mapping="articles")
        assert (c["key"], c["resolution"]) == ("2", "kept_both")


@pytest.mark.parametrize("policy", ["merge", "keep_both"])
async def test_a_check_finds_a_vector_edit_the_sync_has_not_seen_and_repair_resolves_it(
    workdir: Path, app: App, policy: str
) -> None:
    for k in range(1, 4):
        app.insert(k)
    config = _config(workdir, "qdrant-edge", policy)
    await _sync(config)
    await _edit(config, {}, vectors={1})
    async with Engine.open(config, embedders={"default": EMBEDDER}) as engine:
        report = await engine.check("articles", mode="full")
        again = await engine.check("articles", mode="full")
        assert [(d.key, d.category, d.conflict) for d in report.drift] == [(1, "stale", True)]
        [found] = await engine.state.conflicts(mapping="articles", status="open")
        assert (found["key"], found["detected"], sorted(found["fields"])) == (
            "1",
            "check",
            ["vector"],
        )  # logged once
        await engine.repair(again)
        assert (await engine.check("articles", mode="full")).consistent
        assert await engine.state.conflicts(mapping="articles", status="open") == []
    p = (await _points(config))[1]
    if policy == "merge":  # only the sink changed it: kept
        assert _same(p.vector, _theirs(1))
    else:
        assert _same(p.extra[FOREIGN], _theirs(1)) and not _same(p.vector, _theirs(1))


def test_keep_both_needs_a_qdrant_sink_and_keeps_no_payload_to_write_back(
    workdir: Path, app: App
) -> None:
    chroma = 'kind = "chroma"\npath = ".vectorsync/chroma"'
    with pytest.raises(ConfigError, match=r'keep_both".*needs a Qdrant sink.*chroma'):
        load(write_config(workdir, sink=chroma, extra_mapping='conflicts = "keep_both"'))
    both = 'conflicts = "keep_both"\nwrite_back = true'
    with pytest.raises(ConfigError, match="keep_both keeps no payload field"):
        load(write_config(workdir, sink=SINKS["qdrant-edge"], extra_mapping=both))


async def test_switching_to_keep_both_builds_the_next_index_version(
    workdir: Path, app: App
) -> None:
    for k in range(1, 4):
        app.insert(k)
    await _sync(_config(workdir, "qdrant-edge", "merge"))
    config = _config(workdir, "qdrant-edge", "keep_both")
    counts, _ = await _sync(config)  # the collection's vectors change: version 2, swapped
    assert counts.get("embedded", 0) == 0  # its vectors come from the embedding cache
    async with Engine.open(config, embedders={"default": EMBEDDER}) as engine:
        live = [v for v in await engine.indexes("articles") if v["state"] == "live"]
        assert [v["version"] for v in live] == [2]
    await _edit(config, {}, vectors={3})
    app.update(3, tags="b")
    await _sync(config)
    p = (await _points(config))[3]
    assert _same(p.extra[FOREIGN], _theirs(3)) and p.payload["tags"] == "b"


async def test_a_check_while_streaming_keeps_the_vector_edit_it_found(
    workdir: Path, app: App
) -> None:
    import asyncio

    for k in range(1, 4):
        app.insert(k)
    config = _config(workdir, "qdrant-edge", "merge")
    async with Engine.open(config, embedders={"default": EMBEDDER}) as engine:
        await engine.prepare()
        stop = asyncio.Event()
        streaming = asyncio.create_task(engine.run(stop=stop))
        try:
            await engine.wait_for(await engine.head(), timeout=30)
            sink, pid = engine.sinks["vectors"], point_id("articles", 1)
            [rec] = await sink.retrieve("articles", [pid])
            await sink.upsert("articles", [Point(id=pid, vector=_theirs(1), payload=rec.payload)])
            app.update(2, tags="b")  # a change in flight: confirmed after the sync applied it
            report = await engine.check("articles", mode="full")
            assert [(d.key, d.category, d.conflict) for d in report.drift] == [(1, "stale", True)]
        finally:
            stop.set()
            await streaming
