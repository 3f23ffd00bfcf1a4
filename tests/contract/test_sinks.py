"""One contract, every sink: in-memory, qdrant-edge (real engine), qdrant-client local,
Chroma embedded and a real Chroma server, pgvector (a real PostgreSQL 18 with pgvector),
FalkorDB (a real server, a graph per test); Neo4j only where NEO4J_URI names a server."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from vectorsync.chroma_server import ChromaServer
from vectorsync.errors import PermanentError
from vectorsync.model import Condition, PayloadUpdate, Point
from vectorsync.sinks.base import CollectionSpec, Sink
from vectorsync.sinks.chroma import ChromaSink
from vectorsync.sinks.falkordb import FalkorDBSink
from vectorsync.sinks.memory import MemorySink
from vectorsync.sinks.neo4j import Neo4jSink
from vectorsync.sinks.pgvector import PgvectorSink
from vectorsync.sinks.qdrant import QdrantSink
from vectorsync.sinks.qdrant_edge import QdrantEdgeSink

SPEC = CollectionSpec(
    name="docs", dimension=4, distance="cosine", indexes={"author": "keyword", "year": "integer"}
)


def _id(n: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, str(n)))


@pytest.fixture(
    params=[
        "memory",
        "qdrant-edge",
        "qdrant-local",
        "chroma-embedded",
        "chroma-server",
        "pgvector",
        "falkordb",
        pytest.param(
            "neo4j",
            marks=pytest.mark.skipif(
                not os.environ.get("NEO4J_URI"),
                reason="no Neo4j server can run on this machine; set NEO4J_URI (and "
                "NEO4J_USER, NEO4J_PASSWORD) to run against one",
            ),
        ),
    ]
)
async def sink(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Sink]:
    s: Sink
    server: ChromaServer | None = None
    if request.param == "memory":
        s = MemorySink()
    elif request.param == "qdrant-edge":
        s = QdrantEdgeSink("edge", tmp_path / "edge")
    elif request.param == "pgvector":
        pg = request.getfixturevalue("pgvector")
        s = PgvectorSink("pgvector", pg.url, schema=request.getfixturevalue("pgvector_schema"))
    elif request.param == "falkordb":
        url = request.getfixturevalue("falkordb").url
        s = FalkorDBSink("falkordb", url, graph=request.getfixturevalue("graph_name"))
    elif request.param == "neo4j":
        s = Neo4jSink(
            "neo4j",
            os.environ["NEO4J_URI"],
            user=os.environ.get("NEO4J_USER", "neo4j"),
            password=os.environ.get("NEO4J_PASSWORD"),
        )
    elif request.param == "chroma-embedded":
        s = ChromaSink("chroma", path=tmp_path / "chroma")
    elif request.param == "chroma-server":
        server = request.getfixturevalue("chroma")
        s = ChromaSink("chroma", url=server.url)
    else:
        s = QdrantSink("qdrant", path=":memory:")
    await s.open()
    try:
        await s.ensure_collection(SPEC)
        yield s
    finally:
        if isinstance(s, Neo4jSink):  # one database for every test: leave it empty
            await _clear_graph_sink(s)
        await s.close()
        if server is not None:
            server.clear()


async def _clear_graph_sink(sink: Neo4jSink) -> None:
    await sink.run("drop the aliases", "MATCH (a:VectorsyncAlias) DELETE a")
    for name in await sink.collections():
        await sink.drop_collection(name)


async def test_upsert_is_idempotent_and_normalises_cosine_vectors(sink: Sink) -> None:
    p = Point(id=_id(1), vector=[3.0, 0.0, 4.0, 0.0], payload={"author": "ann", "year": 2020})
    await sink.upsert("docs", [p])
    await sink.upsert("docs", [p])
    assert await sink.count("docs") == 1
    [rec] = await sink.retrieve("docs", [_id(1)], with_vectors=True)
    assert rec.payload == {"author": "ann", "year": 2020}
    assert rec.vector == pytest.approx([0.6, 0.0, 0.8, 0.0], abs=1e-6)


async def test_payload_updates_set_and_unset_fields_and_keep_the_vector(sink: Sink) -> None:
    payload = {"a": 1, "b": 2, "c": 3}
    await sink.upsert("docs", [Point(id=_id(1), vector=[1, 0, 0, 0], payload=payload)])
    new = {"a": 5, "c": 3, "d": [1, 2]}
    missing = await sink.update_payloads(
        "docs",
        [
            PayloadUpdate(id=_id(1), set={"a": 5, "d": [1, 2]}, unset=("b",), payload=new),
            PayloadUpdate(id=_id(2), set={"a": 9}, payload={"a": 9}),  # no such point
        ],
    )
    assert missing == [_id(2)] and await sink.count("docs") == 1
    [rec] = await sink.retrieve("docs", [_id(1)], with_vectors=True)
    assert rec.payload == new
    assert rec.vector == pytest.approx([1, 0, 0, 0])
    nulled = {**new, "c": None}
    await sink.update_payloads("docs", [PayloadUpdate(id=_id(1), set={"c": None}, payload=nulled)])
    [rec] = await sink.retrieve("docs", [_id(1)])
    assert rec.payload == nulled  # null is stored, not dropped


async def test_payload_updates_that_share_a_change_land_on_each_point(sink: Sink) -> None:
    """Updates setting the same values go as one call where the sink groups them: each
    point still gets exactly its own change, next to points changed differently."""
    base = {"status": "new", "n": 0, "tag": "x"}
    points = [Point(id=_id(i), vector=[1, 0, 0, float(i)], payload=base) for i in range(1, 9)]
    await sink.upsert("docs", points)
    archived = {**base, "status": "archived"}
    updates = [
        *(
            PayloadUpdate(id=_id(i), set={"status": "archived"}, payload=archived)
            for i in (1, 2, 3)
        ),
        PayloadUpdate(id=_id(4), set={"status": "archived", "n": 4}, payload={**archived, "n": 4}),
        *(
            PayloadUpdate(id=_id(i), set={}, unset=("tag",), payload={"status": "new", "n": 0})
            for i in (5, 6)
        ),
        PayloadUpdate(id=_id(7), set={"status": None}, payload={**base, "status": None}),
        PayloadUpdate(id=_id(99), set={"status": "archived"}, payload=archived),  # absent
    ]
    assert await sink.update_payloads("docs", updates) == [_id(99)]
    got = {r.id: r.payload for r in await sink.retrieve("docs", [_id(i) for i in range(1, 9)])}
    assert got == {
        **{_id(i): archived for i in (1, 2, 3)},
        _id(4): {**archived, "n": 4},
        **{_id(i): {"status": "new", "n": 0} for i in (5, 6)},
        _id(7): {**base, "status": None},
        _id(8): base,
    }


async def test_delete_scroll_and_search(sink: Sink) -> None:
    points = [Point(id=_id(i), vector=[1.0, float(i), 0, 0], payload={"n": i}) for i in range(25)]
    await sink.upsert("docs", points)
    await sink.delete("docs", [_id(3), _id(4), _id(999)])
    seen = [r async for r in sink.scroll("docs", page=7)]
    assert sorted(r.payload["n"] for r in seen) == [i for i in range(25) if i not in (3, 4)]
    hits = await sink.search("docs", [1.0, 0.0, 0.0, 0.0], limit=2)
    assert [h.record.payload["n"] for h in hits] == [0, 1]
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)


async def test_search_filters_on_payload_fields(sink: Sink) -> None:
    authors = ["ann", "bob", "cy"]
    points = [
        Point(
            id=_id(i),
            vector=[1.0, i / 10, 0, 0],
            payload={"author": authors[i % 3], "year": 2020 + i, "tags": ["a", "b"][: i % 3]},
        )
        for i in range(12)
    ]
    await sink.upsert("docs", points)

    async def found(*where: Condition) -> list[int]:
        hits = await sink.search("docs", [1.0, 0.0, 0.0, 0.0], limit=20, where=where)
        return sorted(h.record.payload["year"] - 2020 for h in hits)

    ann = Condition(field="author", op="eq", value="ann")
    assert await found(ann) == [0, 3, 6, 9]
    assert await found(ann, Condition(field="year", op="gte", value=2026)) == [6, 9]
    assert await found(Condition(field="year", op="lt", value=2022)) == [0, 1]
    assert await found(Condition(field="year", op="lte", value=2021)) == [0, 1]
    assert await found(Condition(field="year", op="gt", value=2030)) == [11]
    assert await found(Condition(field="author", op="ne", value="ann")) == [
        1,
        2,
        4,
        5,
        7,
        8,
        10,
        11,
    ]
    # a list payload matches when one of its items does
    assert await found(Condition(field="tags", op="eq", value="b")) == [2, 5, 8, 11]
    assert await found(Condition(field="author", op="eq", value="nobody")) == []


async def test_reopening_with_another_dimension_is_refused(sink: Sink) -> None:
    await sink.upsert("docs", [Point(id=_id(1), vector=[1, 0, 0, 0], payload={})])
    with pytest.raises(PermanentError, match="docs"):
        await sink.ensure_collection(CollectionSpec(name="docs", dimension=8, distance="cosine"))


async def test_a_dropped_collection_leaves_nothing_behind(sink: Sink) -> None:
    # Chroma 1.5's delete_collection keeps list-valued metadata for the next records
    # written anywhere to inherit (chroma-core/chroma#7594); the sink deletes points first
    await sink.ensure_collection(V1)
    await sink.upsert(V1.name, [Point(id=_id(1), vector=[1, 0, 0, 0], payload={"tags": ["x"]})])
    await sink.drop_collection(V1.name)
    await sink.ensure_collection(V2)
    await sink.upsert(V2.name, [Point(id=_id(2), vector=[1.0] * 8, payload={"v": 2})])
    await sink.upsert("docs", [Point(id=_id(3), vector=[1, 0, 0, 0], payload={"v": 3})])
    assert [r.payload for r in await sink.retrieve(V2.name, [_id(2)])] == [{"v": 2}]
    assert [r.payload for r in await sink.retrieve("docs", [_id(3)])] == [{"v": 3}]


async def test_edge_writes_survive_reopen(tmp_path: Path) -> None:
    first = QdrantEdgeSink("edge", tmp_path / "edge")
    await first.open()
    await first.ensure_collection(SPEC)
    await first.upsert("docs", [Point(id=_id(1), vector=[1, 0, 0, 0], payload={"k": 1})])
    await first.close()
    again = QdrantEdgeSink("edge", tmp_path / "edge")
    await again.open()
    await again.ensure_collection(SPEC)
    assert [r.payload async for r in again.scroll("docs")] == [{"k": 1}]
    await again.close()


# Index versions behind an alias: two physical collections of different shapes.
V1 = CollectionSpec(name="articles__v1", dimension=4, distance="cosine")
V2 = CollectionSpec(name="articles__v2", dimension=8, distance="cosine")


async def _two_versions(sink: Sink, v1: CollectionSpec = V1, v2: CollectionSpec = V2) -> None:
    await sink.ensure_collection(v1)
    await sink.ensure_collection(v2)
    await sink.upsert(v1.name, [Point(id=_id(1), vector=[1, 0, 0, 0], payload={"v": 1})])
    await sink.upsert(
        v2.name,
        [Point(id=_id(i), vector=[1.0] * 7 + [float(i)], payload={"v": 2}) for i in (2, 3)],
    )


async def _read_through(sink: Sink, name: str, dimension: int) -> list[tuple[str, int]]:
    """What a reader of ``name`` sees: every point by search, checked against count/retrieve."""
    hits = await sink.search(name, [1.0] * dimension, limit=10)
    ids = [h.record.id for h in hits]
    assert await sink.count(name) == len(ids)
    assert sorted(r.id for r in await sink.retrieve(name, ids)) == sorted(ids)
    return sorted((h.record.id, h.record.payload["v"]) for h in hits)


async def _alias_lifecycle(sink: Sink, alias: str, v1: CollectionSpec, v2: CollectionSpec) -> None:
    await _two_versions(sink, v1, v2)
    assert await sink.alias_target(alias) is None and not await sink.is_alias(alias)
    await sink.set_alias(alias, v1.name)
    assert await sink.alias_target(alias) == v1.name and await sink.is_alias(alias)
    assert await sink.alias_target(v1.name) is None and not await sink.is_alias(v1.name)
    assert await _read_through(sink, alias, 4) == [(_id(1), 1)]
    before = await sink.collections()
    assert v1.name in before and v2.name in before and alias not in before
    # a reader ensuring the alias' collection gets the live version, nothing new
    await sink.ensure_collection(CollectionSpec(name=alias, dimension=4, distance="cosine"))
    assert await sink.collections() == before

    await sink.set_alias(alias, v2.name)  # the swap
    assert await sink.alias_target(alias) == v2.name
    assert await _read_through(sink, alias, 8) == sorted([(_id(2), 2), (_id(3), 2)])
    await sink.set_alias(alias, v2.name)  # again: nothing changes
    assert await sink.alias_target(alias) == v2.name

    with pytest.raises(PermanentError, match=f"{v2.name}.*live.*{alias}"):
        await sink.drop_collection(v2.name)
    with pytest.raises(PermanentError, match=f"{alias}.*is an alias"):
        await sink.drop_collection(alias)
    await sink.drop_collection(v1.name)
    await sink.drop_collection(v1.name)  # idempotent
    assert v1.name not in await sink.collections()
    assert await _read_through(sink, alias, 8) == sorted([(_id(2), 2), (_id(3), 2)])


async def test_an_alias_names_the_live_version_and_swaps(sink: Sink) -> None:
    await _alias_lifecycle(sink, "articles", V1, V2)
    assert await sink.collections() == ["articles__v2", "docs"]


async def test_set_alias_refuses_a_real_collection_and_bad_targets(sink: Sink) -> None:
    await _two_versions(sink)
    with pytest.raises(PermanentError, match=r"'docs'.*a collection has that name.*rename"):
        await sink.set_alias("docs", V1.name)
    with pytest.raises(PermanentError, match="no such collection"):
        await sink.set_alias("articles", "articles__v9")
    await sink.set_alias("articles", V1.name)
    with pytest.raises(PermanentError, match="alias itself"):
        await sink.set_alias("latest", "articles")
    assert await sink.alias_target("docs") is None and await sink.alias_target("latest") is None


async def test_a_collection_from_before_versions_is_renamed_then_aliased(sink: Sink) -> None:
    await sink.upsert("docs", [Point(id=_id(1), vector=[1, 0, 0, 0], payload={"v": 1})])
    if isinstance(sink, QdrantSink):  # Qdrant cannot rename a collection, local or server
        with pytest.raises(PermanentError, match="no collection rename"):
            await sink.rename_collection("docs", "docs__v1")
        return
    await sink.ensure_collection(V1)
    with pytest.raises(PermanentError, match="exists"):
        await sink.rename_collection("docs", V1.name)
    await sink.rename_collection("docs", "docs__v1")
    assert await sink.collections() == ["articles__v1", "docs__v1"]
    await sink.upsert("docs__v1", [Point(id=_id(2), vector=[0, 1, 0, 0], payload={"v": 1})])
    await sink.set_alias("docs", "docs__v1")
    assert await _read_through(sink, "docs", 4) == sorted([(_id(1), 1), (_id(2), 1)])
    with pytest.raises(PermanentError, match="live"):
        await sink.rename_collection("docs__v1", "docs__v2")
    with pytest.raises(PermanentError, match="no such collection"):
        await sink.rename_collection("nothing", "docs__v3")


async def test_edge_alias_is_a_relative_symlink_a_fresh_load_follows(tmp_path: Path) -> None:
    import qdrant_edge as qe

    folder = tmp_path / "edge"
    sink = QdrantEdgeSink("edge", folder)
    await sink.open()
    await _two_versions(sink)
    await sink.set_alias("articles", V1.name)
    await sink.close()
    assert os.readlink(folder / "articles") == V1.name  # relative: the folder can move
    assert sorted(p.name for p in folder.iterdir()) == [
        ".vectorsync.lock",
        *sorted(["articles", V1.name, V2.name]),
    ]  # no temporary link left behind

    def ids_by_loading(name: str) -> list[str]:
        shard = qe.EdgeShard.load(str(folder / name))  # what an application does
        try:
            records, _ = shard.scroll(qe.ScrollRequest(limit=10, with_payload=False))
            return sorted(str(r.id) for r in records)
        finally:
            shard.close()

    assert ids_by_loading("articles") == [_id(1)]
    again = QdrantEdgeSink("edge", folder)  # a second instance finds the alias
    await again.open()
    assert await again.alias_target("articles") == V1.name
    await again.ensure_collection(CollectionSpec(name="articles", dimension=4, distance="cosine"))
    assert await _read_through(again, "articles", 4) == [(_id(1), 1)]
    await again.ensure_collection(V2)
    await again.set_alias("articles", V2.name)
    assert await _read_through(again, "articles", 8) == sorted([(_id(2), 2), (_id(3), 2)])
    await again.close()
    assert ids_by_loading("articles") == sorted([_id(2), _id(3)])
    assert ids_by_loading(V1.name) == [_id(1)]  # the old version is untouched


async def test_edge_drop_and_rename_close_the_open_shard(tmp_path: Path) -> None:
    sink = QdrantEdgeSink("edge", tmp_path / "edge")
    await sink.open()
    await _two_versions(sink)
    await sink.drop_collection(V1.name)  # open in the sink's cache
    assert not (tmp_path / "edge" / V1.name).exists()
    await sink.ensure_collection(V1)  # a new, empty one
    assert await sink.count(V1.name) == 0
    await sink.rename_collection(V2.name, "articles__v3")  # reopened under its new name
    assert await sink.count("articles__v3") == 2
    await sink.upsert("articles__v3", [Point(id=_id(4), vector=[1.0] * 8, payload={"v": 3})])
    with pytest.raises(PermanentError, match="not opened"):
        await sink.count(V2.name)
    with pytest.raises(PermanentError, match="'/'"):
        await sink.drop_collection("../elsewhere")
    await sink.close()
    again = QdrantEdgeSink("edge", tmp_path / "edge")
    await again.open()
    await again.ensure_collection(
        CollectionSpec(name="articles__v3", dimension=8, distance="cosine")
    )
    assert await again.count("articles__v3") == 3
    await again.close()


async def test_qdrant_local_alias_survives_reopen_and_serves_query_points(tmp_path: Path) -> None:
    from qdrant_client import AsyncQdrantClient

    path = str(tmp_path / "local")
    sink = QdrantSink("qdrant", path=path)
    await sink.open()
    await _two_versions(sink)
    await sink.set_alias("articles", V1.name)
    await sink.close()
    client = AsyncQdrantClient(path=path)  # a reader of its own, by the alias name
    try:
        found = await client.query_points("articles", query=[1.0, 0, 0, 0], limit=5)
        assert [str(p.id) for p in found.points] == [_id(1)]
    finally:
        await client.close()
    again = QdrantSink("qdrant", path=path)
    await again.open()
    await again.set_alias("articles", V2.name)
    found = await again.client.query_points("articles", query=[1.0] * 8, limit=5)
    assert sorted(str(p.id) for p in found.points) == sorted([_id(2), _id(3)])
    await again.close()


@pytest.mark.skipif(
    not os.environ.get("QDRANT_URL"),
    reason="needs a Qdrant server at QDRANT_URL; none can be installed on this machine, "
    "so this has not run here",
)
async def test_qdrant_server_aliases() -> None:
    run = uuid.uuid4().hex[:8]
    alias = f"vs_test_{run}"
    v1 = CollectionSpec(name=f"{alias}__v1", dimension=4, distance="cosine")
    v2 = CollectionSpec(name=f"{alias}__v2", dimension=8, distance="cosine")
    sink = QdrantSink(
        "qdrant", url=os.environ["QDRANT_URL"], api_key=os.environ.get("QDRANT_API_KEY")
    )
    await sink.open()
    try:
        await _alias_lifecycle(sink, alias, v1, v2)
        found = await sink.client.query_points(alias, query=[1.0] * 8, limit=5)
        assert sorted(str(p.id) for p in found.points) == sorted([_id(2), _id(3)])
        with pytest.raises(PermanentError, match="no collection rename"):
            await sink.rename_collection(v2.name, f"{alias}__v3")
    finally:
        from qdrant_client import models

        delete = models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias))
        with contextlib.suppress(Exception):
            await sink.client.update_collection_aliases([delete])
        for spec in (v1, v2):
            await sink.client.delete_collection(spec.name)
        await sink.close()
