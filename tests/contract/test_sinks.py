"""One contract, every sink: in-memory, qdrant-edge (real engine), qdrant-client local."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from vectorsync.errors import PermanentError
from vectorsync.model import Condition, PayloadUpdate, Point
from vectorsync.sinks.base import CollectionSpec, Sink
from vectorsync.sinks.memory import MemorySink
from vectorsync.sinks.qdrant import QdrantSink
from vectorsync.sinks.qdrant_edge import QdrantEdgeSink

SPEC = CollectionSpec(
    name="docs", dimension=4, distance="cosine", indexes={"author": "keyword", "year": "integer"}
)


def _id(n: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, str(n)))


@pytest.fixture(params=["memory", "qdrant-edge", "qdrant-local"])
async def sink(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Sink]:
    s: Sink
    if request.param == "memory":
        s = MemorySink()
    elif request.param == "qdrant-edge":
        s = QdrantEdgeSink("edge", tmp_path / "edge")
    else:
        s = QdrantSink("qdrant", path=":memory:")
    await s.open()
    await s.ensure_collection(SPEC)
    yield s
    await s.close()


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
