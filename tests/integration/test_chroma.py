"""SQLite → Chroma through the engine, embedded and against a real ``chroma run`` server,
verified by reading Chroma with its own client; and what only the Chroma sink does (its
payload mapping, its aliases as a reader sees them, a server that is down)."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import App, load, sync_once, write_config
from vectorsync.chroma_server import ChromaServer
from vectorsync.embed.hash import HashEmbedder
from vectorsync.engine import Engine
from vectorsync.errors import PermanentError, SinkError
from vectorsync.model import Condition, PayloadUpdate, Point, point_id
from vectorsync.render import Renderer
from vectorsync.sinks.base import CollectionSpec
from vectorsync.sinks.chroma import ALIASES, ChromaSink, live_collection


@dataclass
class Target:
    """Where a test's Chroma is: the sink's TOML, and how a reader of its own connects."""

    toml: str
    path: Path | None = None
    url: str | None = None

    def sink(self) -> ChromaSink:
        return ChromaSink("chroma", path=self.path, url=self.url)

    def client(self) -> Any:
        import chromadb
        from chromadb.config import Settings

        settings = Settings(anonymized_telemetry=False)
        if self.path is not None:
            return chromadb.PersistentClient(path=str(self.path), settings=settings)
        assert self.url is not None
        host, port = self.url.removeprefix("http://").split(":")
        return chromadb.HttpClient(host=host, port=int(port), settings=settings)


@pytest.fixture(params=["embedded", "server"])
def target(request: pytest.FixtureRequest, workdir: Path) -> Iterator[Target]:
    if request.param == "embedded":
        yield Target(
            'kind = "chroma"\npath = ".vectorsync/chroma"', path=workdir / ".vectorsync" / "chroma"
        )
        return
    server: ChromaServer = request.getfixturevalue("chroma")
    try:
        yield Target(f'kind = "chroma"\nurl = "{server.url}"', url=server.url)
    finally:
        server.clear()


class Reader:
    """A reader with Chroma's own client, by the mapping's collection name."""

    def __init__(self, target: Target) -> None:
        self.target = target

    def __enter__(self) -> Reader:
        self.client = self.target.client()
        return self

    def __exit__(self, *exc: object) -> None:
        _close(self.client)

    def points(self, name: str = "articles") -> dict[str, tuple[list[float], dict[str, Any]]]:
        got = live_collection(self.client, name).get(include=["embeddings", "metadatas"])
        return {
            pid: ([float(x) for x in vec], dict(meta or {}))
            for pid, vec, meta in zip(got["ids"], got["embeddings"], got["metadatas"], strict=True)
        }


def _close(client: Any) -> None:
    """Close a chromadb client, with the HTTP sessions it leaves open."""
    from vectorsync.sinks.chroma import _sessions

    sessions = _sessions(client) if hasattr(client, "_server") else []
    client.close()
    for s in sessions:
        s.close()


def assert_in_chroma(target: Target, app: App, workdir: Path) -> None:
    """Chroma holds one point per live row — its current text's vector and its current
    payload as plain metadata — and nothing else."""
    mapping = load(workdir / "vectorsync.toml").mappings[0]
    renderer, embedder = Renderer(mapping), HashEmbedder()
    rows = app.rows()
    with Reader(target) as reader:
        points = reader.points()
    assert set(points) == {point_id("articles", k) for k in rows}
    for key, row in rows.items():
        vector, meta = points[point_id("articles", key)]
        rendered = renderer.render(row)
        expected = {k: v for k, v in rendered.payload.items() if v is not None}
        assert {k: meta[k] for k in expected} == expected, key
        nulls = sorted(k for k, v in rendered.payload.items() if v is None)
        assert meta.get("_vs_json", []) == nulls and all(meta[k] == "null" for k in nulls)
        assert meta["_vs_key"] == key
        want = embedder.vector(rendered.text)
        assert max(abs(a - b) for a, b in zip(vector, want, strict=True)) < 1e-5, key


async def test_sqlite_to_chroma_converges_read_with_chromas_own_client(
    workdir: Path, app: App, target: Target
) -> None:
    for k in range(1, 41):
        app.insert(k, author=["ann", "bob"][k % 2], published=2000 + k)
    cfg = write_config(workdir, sink=target.toml, batch_size=16)
    embedder = HashEmbedder("default")
    counts = await sync_once(cfg, embedder)
    assert counts["upserted"] == 40 and embedder.texts_embedded == 40
    assert_in_chroma(target, app, workdir)

    app.update(3, title="a new title")  # content
    app.update(4, body="a new body", author="cy")  # content and payload
    app.update(5, author="zed", published=1999)  # payload only
    app.update(6, tags=None)  # a payload field becomes NULL
    app.delete(7)
    app.delete(8)
    app.insert(41)
    counts = await sync_once(cfg, embedder)
    assert counts["payload_only"] == 2 and counts["upserted"] == 3
    assert embedder.texts_embedded == 43  # payload-only changes called no embedder
    assert_in_chroma(target, app, workdir)

    app.update(6, tags="back")  # the NULL field gets a value again: _vs_json is dropped
    app.update(9, title="again")
    await sync_once(cfg, embedder)
    assert_in_chroma(target, app, workdir)
    with Reader(target) as reader:
        assert "_vs_json" not in reader.points()[point_id("articles", 6)][1]

    # a template change builds version 2 beside version 1 and swaps the alias: a reader
    # by name follows it by resolving the name again
    write_config(workdir, sink=target.toml, text="{{ title }} / {{ author }}")
    await sync_once(cfg, embedder)
    async with Engine.open(load(cfg)) as engine:
        states = {v["version"]: v["state"] for v in await engine.indexes("articles")}
    assert states == {1: "previous", 2: "live"}
    assert_in_chroma(target, app, workdir)
    with Reader(target) as reader:
        assert live_collection(reader.client, "articles").name == "articles__v2"
        names = {c.name for c in reader.client.list_collections()}
    assert names == {"articles__v1", "articles__v2", ALIASES}


async def test_random_changes_and_shuffled_redelivery_converge(
    workdir: Path, app: App, target: Target
) -> None:
    rng = random.Random(5)
    app.random_ops(rng, 150)
    cfg = write_config(workdir, sink=target.toml, batch_size=37)
    await sync_once(cfg)
    app.random_ops(rng, 300)
    await sync_once(cfg)
    assert_in_chroma(target, app, workdir)
    replay = [(k, op) for k in range(1, 201) for op in ("insert", "update", "delete")]
    rng.shuffle(replay)
    app.inject(replay)  # every change again, in random order: nothing to write
    counts = await sync_once(cfg)
    assert counts.get("upserted", 0) == 0 and counts.get("payload_only", 0) == 0
    assert_in_chroma(target, app, workdir)


SPEC = CollectionSpec(name="docs", dimension=2, distance="cosine")


def _id(n: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, str(n)))


async def test_payload_values_map_to_metadata_and_back(target: Target) -> None:
    payload = {
        "s": "text",
        "i": 7,
        "f": 1.5,
        "b": True,
        "tags": ["a", "b"],
        "ints": [1, 2],
        "empty": [],
        "mixed": [1, "a"],
        "obj": {"k": [1, None]},
        "none": None,
        "huge": 2**70,  # past 64 bits Chroma would keep a float
    }
    sink = target.sink()
    await sink.open()
    try:
        await sink.ensure_collection(SPEC)
        await sink.upsert("docs", [Point(id=_id(1), vector=[1.0, 0.0], payload=payload)])
        [rec] = await sink.retrieve("docs", [_id(1)])
        assert rec.payload == payload
        eq = Condition(field="ints", op="eq", value=2)
        assert [h.record.id for h in await sink.search("docs", [1.0, 0.0], where=[eq])] == [_id(1)]
        with Reader(target) as reader:
            [(_, meta)] = reader.points("docs").values()
        assert {k: meta[k] for k in ("s", "i", "f", "b", "tags", "ints")} == {
            k: payload[k] for k in ("s", "i", "f", "b", "tags", "ints")
        }  # stored as they are: a reader with Chroma's client filters on them
        assert meta["_vs_json"] == ["empty", "huge", "mixed", "none", "obj"]
        assert meta["obj"] == '{"k": [1, null]}' and meta["none"] == "null"

        # a field removed from the payload is removed from the metadata (Chroma merges)
        smaller = {"s": "other", "tags": ["c"]}
        update = PayloadUpdate(id=_id(1), set={"s": "other", "tags": ["c"]}, payload=smaller)
        assert await sink.update_payloads("docs", [update]) == []
        with Reader(target) as reader:
            [(vector, meta)] = reader.points("docs").values()
        assert meta == smaller and vector == pytest.approx([1.0, 0.0])
        # a field switching between a list, a text and another list type
        for new in ({"tags": "x"}, {"tags": [1, 2], "n": [1.5]}, {"n": 2}, {"tags": ["z"]}):
            await sink.update_payloads("docs", [PayloadUpdate(id=_id(1), set=new, payload=new)])
            assert [r.payload for r in await sink.retrieve("docs", [_id(1)])] == [new]
    finally:
        await sink.close()


async def test_a_value_chroma_cannot_hold_is_refused_before_anything_is_written(
    target: Target,
) -> None:
    sink = target.sink()
    await sink.open()
    try:
        await sink.ensure_collection(SPEC)
        good = Point(id=_id(1), vector=[1.0, 0.0], payload={"v": 1})
        await sink.upsert("docs", [good])
        bad = Point(id=_id(2), vector=[0.0, 1.0], payload={"blob": b"\x00\x01"})
        with pytest.raises(PermanentError, match=r"payload field 'blob' holds a bytes"):
            await sink.upsert("docs", [Point(id=_id(1), vector=[0.0, 1.0], payload={}), bad])
        with pytest.raises(PermanentError, match=r"'_vs_json'.*reserved"):
            await sink.upsert("docs", [Point(id=_id(3), vector=[1, 0], payload={"_vs_json": 1})])
        wrong = Point(id=_id(1), vector=[1.0, 0.0, 0.0], payload={})
        with pytest.raises(PermanentError, match=r"dimension 3.*holds dimension 2"):
            await sink.upsert("docs", [wrong])
        nan = Point(id=_id(1), vector=[float("nan"), 0.0], payload={})  # Chroma refuses it
        with pytest.raises(PermanentError, match="NaN or infinity"):
            await sink.upsert("docs", [nan])
        [rec] = await sink.retrieve("docs", [_id(1)], with_vectors=True)  # untouched
        assert rec.payload == {"v": 1} and rec.vector == pytest.approx([1.0, 0.0])
        with pytest.raises(PermanentError, match="compares numbers only"):
            await sink.search("docs", [1.0, 0.0], where=[Condition(field="v", op="gt", value="a")])
        with pytest.raises(PermanentError, match="Chroma needs 3-512"):
            await sink.ensure_collection(CollectionSpec(name="ab", dimension=2, distance="cosine"))
    finally:
        await sink.close()


async def test_dot_and_euclid_scores_match_qdrant(target: Target) -> None:
    sink = target.sink()
    await sink.open()
    try:
        for name, distance in (("by-dot", "dot"), ("by-euclid", "euclid")):
            await sink.ensure_collection(CollectionSpec(name=name, dimension=2, distance=distance))  # type: ignore[arg-type]
            points = [
                Point(id=_id(1), vector=[3.0, 4.0], payload={}),
                Point(id=_id(2), vector=[1.0, 0.0], payload={}),
            ]
            await sink.upsert(name, points)
        dot = await sink.search("by-dot", [0.0, 0.5])
        assert [(h.record.id, h.score) for h in dot] == [
            (_id(1), pytest.approx(2.0, abs=1e-5)),
            (_id(2), pytest.approx(0.0, abs=1e-5)),
        ]  # the dot product, highest first (vectors are kept as they are)
        euclid = await sink.search("by-euclid", [0.0, 0.5])
        assert [(h.record.id, h.score) for h in euclid] == [
            (_id(2), pytest.approx(1.118034, abs=1e-5)),
            (_id(1), pytest.approx(4.609772, abs=1e-5)),
        ]  # the distance, nearest first, as Qdrant answers
        with pytest.raises(PermanentError, match="exists with dimension 2 and dot distance"):
            await sink.ensure_collection(
                CollectionSpec(name="by-dot", dimension=2, distance="cosine")
            )
    finally:
        await sink.close()


async def test_a_reader_by_name_follows_an_alias_swap(target: Target) -> None:
    sink = target.sink()
    await sink.open()
    try:
        for version, n in (("articles__v1", 1), ("articles__v2", 2)):
            await sink.ensure_collection(
                CollectionSpec(name=version, dimension=2, distance="cosine")
            )
            await sink.upsert(version, [Point(id=_id(n), vector=[1.0, 0.0], payload={"v": n})])
        await sink.set_alias("articles", "articles__v1")
        with Reader(target) as reader:
            held = live_collection(reader.client, "articles")
            assert held.get()["ids"] == [_id(1)]
            await sink.set_alias("articles", "articles__v2")
            assert held.get()["ids"] == [_id(1)]  # a collection held is not re-resolved
            again = live_collection(reader.client, "articles")
            assert again.name == "articles__v2" and again.get()["ids"] == [_id(2)]
            record = reader.client.get_collection(ALIASES).get(ids=["articles"])
            assert record["metadatas"] == [{"collection": "articles__v2"}]
        # a second sink (another process, say) finds the alias where the first left it
        other = target.sink()
        await other.open()
        try:
            assert await other.alias_target("articles") == "articles__v2"
            assert [r.payload async for r in other.scroll("articles")] == [{"v": 2}]
        finally:
            await other.close()
    finally:
        await sink.close()


async def test_a_server_that_is_down_is_an_outage_in_problems_until_it_starts() -> None:
    server = ChromaServer()  # a free port, nothing listening yet
    sink = ChromaSink("search", url=server.url)
    await sink.open()  # nothing is connected yet: a sink that is down does not stop the run
    try:
        [problem] = await sink.problems()
        assert f"sink 'search': no Chroma server answers at {server.url}" in problem
        assert "sinks.search.url" in problem
        with pytest.raises(SinkError, match="no Chroma server answers"):  # retryable
            await sink.ensure_collection(SPEC)
        server.start()
        assert await sink.problems() == []
        await sink.ensure_collection(SPEC)  # the same sink, no reopening
        await sink.upsert("docs", [Point(id=_id(1), vector=[1.0, 0.0], payload={"v": 1})])
        assert await sink.count("docs") == 1
    finally:
        await sink.close()
        server.destroy()
