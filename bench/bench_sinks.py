"""Sink benchmarks: each operation through vectorsync's Sink ÷ the store's own client doing
the same work in the same run; figures go to bench/results/sink-<kind>.json.

python bench/bench_sinks.py chroma             # embedded and a `chroma run` server, 10k points
python bench/bench_sinks.py chroma --points 2000 --modes embedded
python bench/bench_sinks.py falkordb           # a throwaway FalkorDB server, 10k points

Per mode: new points (upserts/s), re-written vectors of existing points (the content-change
path: the raw side is Chroma's own ``upsert`` and its delete + add), payload-only updates
(the raw side is one ``update`` that already knows which ids exist), and a filtered query's
median latency (the raw side with a plain ``$eq``, and with the sink's own filter, whose
``eq`` also matches inside a list). Writes go in calls of 512 points, the worker's chunk.

FalkorDB: the raw side is FalkorDB's own async client with the same indexes, interleaved
with the sink call by call on one server (the box is shared), writing
``UNWIND ... MERGE ... SET n += r.p, n.vector = vecf32(r.v)`` (new points) and ``UNWIND ...
MATCH ... SET n += r.m`` with nulls for the removed field (payload updates); the filtered
query is ``db.idx.vector.queryNodes`` with a plain ``WHERE`` (and the sink's search).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_sync import _write
from vectorsync.chroma_server import chroma_server
from vectorsync.model import Condition, PayloadUpdate, Point
from vectorsync.sinks._chroma_values import to_metadata, where_filter
from vectorsync.sinks.base import CollectionSpec
from vectorsync.sinks.chroma import ChromaSink, _sessions

CHUNK = 512  # the worker's _WRITE_CHUNK
AUTHORS = ["ann", "bob", "cy", "dee", "eve"]


def _points(n: int, dim: int, rng: random.Random, version: int) -> list[Point]:
    out = []
    for i in range(n):
        v = np.array([rng.gauss(0, 1) for _ in range(dim)], dtype=np.float32)
        v /= np.linalg.norm(v)
        payload = {
            "author": AUTHORS[i % 5],
            "tags": ["a", "b", "c"][: 1 + i % 3],
            "published": 2000 + i % 25,
            "_vs_key": i,
            "_vs_text_hash": f"{rng.getrandbits(64):016x}",
            "_vs_version": version,
            "_vs_schema": "s1",
        }
        out.append(
            Point(id=f"{i:08d}-0000-5000-8000-000000000000", vector=v.tolist(), payload=payload)
        )
    return out


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1)


async def _timed(call: Callable[[], Awaitable[Any]]) -> float:
    start = time.perf_counter()
    await call()
    return time.perf_counter() - start


def _timed_sync(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _chunks(items: list[Any]) -> Iterator[list[Any]]:
    for i in range(0, len(items), CHUNK):
        yield items[i : i + CHUNK]


class Raw:
    """Chroma's own client doing what the sink does, the way a user would write it."""

    def __init__(self, client: Any, name: str, dim: int) -> None:
        self.client = client
        self.col = client.create_collection(
            name, embedding_function=None, configuration={"hnsw": {"space": "cosine"}}
        )

    @staticmethod
    def _rows(points: list[Point]) -> tuple[list[str], Any, list[Any]]:
        ids = [p.id for p in points]
        vectors = np.asarray([p.vector for p in points], dtype=np.float32)
        return ids, vectors, [to_metadata("raw", p.id, p.payload) for p in points]

    def add(self, points: list[Point]) -> None:
        for chunk in _chunks(points):
            ids, vectors, metas = self._rows(chunk)
            self.col.add(ids=ids, embeddings=vectors, metadatas=metas)

    def upsert(self, points: list[Point]) -> None:
        for chunk in _chunks(points):
            ids, vectors, metas = self._rows(chunk)
            self.col.upsert(ids=ids, embeddings=vectors, metadatas=metas)

    def delete_add(self, points: list[Point]) -> None:
        for chunk in _chunks(points):
            ids, vectors, metas = self._rows(chunk)
            self.col.delete(ids=ids)
            self.col.add(ids=ids, embeddings=vectors, metadatas=metas)

    def update(self, updates: list[PayloadUpdate]) -> None:
        for chunk in _chunks(updates):
            metas = []
            for u in chunk:
                meta = to_metadata("raw", u.id, u.payload) or {}
                meta.update({k: None for k in u.unset})
                metas.append(meta)
            self.col.update(ids=[u.id for u in chunk], metadatas=metas)

    def query(self, vector: list[float], where: Any) -> None:
        self.col.query(
            query_embeddings=np.asarray([vector], dtype=np.float32), n_results=10, where=where
        )


@contextmanager
def _client(mode: str, folder: Path, url: str | None) -> Iterator[Any]:
    import chromadb
    from chromadb.config import Settings

    settings = Settings(anonymized_telemetry=False)
    if mode == "embedded":
        client = chromadb.PersistentClient(path=str(folder / "raw"), settings=settings)
    else:
        assert url is not None
        host, port = url.removeprefix("http://").split(":")
        client = chromadb.HttpClient(host=host, port=int(port), settings=settings)
    sessions = _sessions(client) if mode == "server" else []
    try:
        yield client
    finally:
        client.close()
        for s in sessions:
            s.close()


async def _mode(mode: str, n: int, dim: int, url: str | None) -> dict[str, Any]:
    rng = random.Random(1)
    first, second = _points(n, dim, rng, 1), _points(n, dim, rng, 2)
    updates = [
        PayloadUpdate(
            id=p.id,
            set={"author": "zed", "_vs_version": 3},
            unset=("tags",),
            payload={
                k: v
                for k, v in {**p.payload, "author": "zed", "_vs_version": 3}.items()
                if k != "tags"
            },
        )
        for p in second
    ]
    folder = Path(tempfile.mkdtemp(prefix="bench-chroma-"))
    sink = (
        ChromaSink("bench", path=folder / "sink", url=None)
        if mode == "embedded"
        else ChromaSink("bench", url=url)
    )
    await sink.open()
    figures: dict[str, Any] = {}
    try:
        await sink.ensure_collection(
            CollectionSpec(name="sink-docs", dimension=dim, distance="cosine")
        )

        async def each(call: Callable[[list[Any]], Awaitable[Any]], items: list[Any]) -> None:
            for chunk in _chunks(items):
                await call(chunk)

        with _client(mode, folder, url) as client:
            raw = Raw(client, "raw-docs", dim)
            raw_new = _timed_sync(lambda: raw.add(first))
            sink_new = await _timed(lambda: each(lambda c: sink.upsert("sink-docs", c), first))
            raw_upsert = _timed_sync(lambda: raw.upsert(second))
            sink_rewrite = await _timed(lambda: each(lambda c: sink.upsert("sink-docs", c), second))
            raw_delete_add = _timed_sync(lambda: raw.delete_add(first))
            raw_update = _timed_sync(lambda: raw.update(updates))
            sink_update = await _timed(
                lambda: each(lambda c: sink.update_payloads("sink-docs", c), updates)
            )

            where = [
                Condition(field="author", op="eq", value="zed"),
                Condition(field="published", op="gte", value=2020),
            ]
            raw_where = {"$and": [{"author": {"$eq": "zed"}}, {"published": {"$gte": 2020}}]}
            queries = [p.vector for p in first[:50]]
            same_where = where_filter("raw", where)  # eq also matches inside a list
            raw_q = [_timed_sync(lambda v=v: raw.query(v, raw_where)) for v in queries]
            raw_same_q = [_timed_sync(lambda v=v: raw.query(v, same_where)) for v in queries]
            sink_q = [
                await _timed(lambda v=v: sink.search("sink-docs", v, limit=10, where=where))
                for v in queries
            ]
            assert await sink.count("sink-docs") == n and raw.col.count() == n
    finally:
        await sink.close()
        shutil.rmtree(folder, ignore_errors=True)
    figures["new_points_per_s"] = {"sink": _rate(n, sink_new), "raw_add": _rate(n, raw_new)}
    figures["new_points_ratio"] = round(raw_new / sink_new, 3)
    figures["rewritten_vectors_per_s"] = {
        "sink_delete_add": _rate(n, sink_rewrite),
        "raw_upsert": _rate(n, raw_upsert),
        "raw_delete_add": _rate(n, raw_delete_add),
    }
    figures["rewritten_ratio_over_raw_upsert"] = round(raw_upsert / sink_rewrite, 3)
    figures["rewritten_ratio_over_raw_delete_add"] = round(raw_delete_add / sink_rewrite, 3)
    figures["payload_updates_per_s"] = {
        "sink": _rate(n, sink_update),
        "raw_update": _rate(n, raw_update),
    }
    figures["payload_updates_ratio"] = round(raw_update / sink_update, 3)
    figures["filtered_query_ms_median"] = {
        "sink": round(statistics.median(sink_q) * 1000, 2),
        "raw_plain_eq": round(statistics.median(raw_q) * 1000, 2),
        "raw_same_filter": round(statistics.median(raw_same_q) * 1000, 2),
    }
    return figures


async def bench_chroma(n: int, dim: int, modes: list[str]) -> None:
    figures: dict[str, Any] = {"points": n, "dimension": dim, "chunk": CHUNK, "goal_ratio": 0.8}
    if "embedded" in modes:
        figures["embedded"] = await _mode("embedded", n, dim, None)
    if "server" in modes:
        with chroma_server() as server:
            figures["server"] = await _mode("server", n, dim, server.url)
    _write("sink-chroma", figures)


def _updates(points: list[Point]) -> list[PayloadUpdate]:
    changed = {"author": "zed", "_vs_version": 3}
    return [
        PayloadUpdate(
            id=p.id,
            set=changed,
            unset=("tags",),
            payload={k: v for k, v in {**p.payload, **changed}.items() if k != "tags"},
        )
        for p in points
    ]


class _RawGraph:
    """What a user of FalkorDB's own async client writes for the same work."""

    UPSERT = "UNWIND $rows AS r MERGE (n:Doc {id: r.id}) SET n += r.p, n.vector = vecf32(r.v)"
    UPDATE = "UNWIND $rows AS r MATCH (n:Doc {id: r.id}) SET n += r.m"
    QUERY = (
        "CALL db.idx.vector.queryNodes('Doc', 'vector', 100, vecf32($q)) YIELD node, score "
        "WHERE node.author = 'zed' AND node.published >= 2020 "
        "RETURN node.id, score ORDER BY score LIMIT 10"
    )

    def __init__(self, url: str) -> None:
        from falkordb.asyncio import FalkorDB

        self.db = FalkorDB.from_url(url, socket_timeout=120)
        self.g = self.db.select_graph("raw")

    async def setup(self, dim: int) -> None:
        await self.g.query("CREATE INDEX FOR (n:Doc) ON (n.id)")
        await self.g.query(
            "CREATE VECTOR INDEX FOR (n:Doc) ON (n.vector) "
            f"OPTIONS {{dimension: {dim}, similarityFunction: 'cosine'}}"
        )
        for field in ("author", "published"):
            await self.g.query(f"CREATE INDEX FOR (n:Doc) ON (n.{field})")

    async def upsert(self, chunk: list[Point]) -> None:
        rows = [{"id": p.id, "p": p.payload, "v": p.vector} for p in chunk]
        await self.g.query(self.UPSERT, {"rows": rows})

    async def update(self, chunk: list[PayloadUpdate]) -> None:
        rows = [{"id": u.id, "m": {**u.set, **dict.fromkeys(u.unset)}} for u in chunk]
        await self.g.query(self.UPDATE, {"rows": rows})

    async def query(self, vector: list[float]) -> int:
        return len((await self.g.ro_query(self.QUERY, {"q": vector})).result_set)

    async def close(self) -> None:
        await self.db.aclose()
        await self.db.connection.connection_pool.disconnect()


async def bench_falkordb(n: int, dim: int) -> None:
    """Raw and sink interleaved call by call on one server (each its own graph), so the
    other work on a shared box weighs on both alike."""
    from vectorsync.falkordb_server import falkordb_server
    from vectorsync.sinks.falkordb import FalkorDBSink

    points = _points(n, dim, random.Random(1), 1)
    updates = _updates(points)
    where = [
        Condition(field="author", op="eq", value="zed"),
        Condition(field="published", op="gte", value=2020),
    ]
    spec = CollectionSpec(
        name="docs",
        dimension=dim,
        distance="cosine",
        indexes={"author": "keyword", "published": "integer"},
    )
    took: dict[str, float] = dict.fromkeys(("raw_new", "sink_new", "raw_upd", "sink_upd"), 0.0)
    raw_q, sink_q, raw_hits = [], [], []
    with falkordb_server() as server:
        raw, sink = _RawGraph(server.url), FalkorDBSink("bench", server.url, graph="sink")
        await sink.open()
        try:
            await raw.setup(dim)
            await sink.ensure_collection(spec)
            for i, chunk in enumerate(_chunks(points)):
                calls = [
                    ("raw_new", lambda c=chunk: raw.upsert(c)),
                    ("sink_new", lambda c=chunk: sink.upsert("docs", c)),
                ]
                for key, call in calls[:: 1 if i % 2 else -1]:  # who goes first alternates
                    took[key] += await _timed(call)
            for i, chunk in enumerate(_chunks(updates)):
                calls = [
                    ("raw_upd", lambda c=chunk: raw.update(c)),
                    ("sink_upd", lambda c=chunk: sink.update_payloads("docs", c)),
                ]
                for key, call in calls[:: 1 if i % 2 else -1]:
                    took[key] += await _timed(call)
            for p in points[:100]:
                start = time.perf_counter()
                raw_hits.append(await raw.query(p.vector))
                raw_q.append(time.perf_counter() - start)
                start = time.perf_counter()
                hits = await sink.search("docs", p.vector, limit=10, where=where)
                sink_q.append(time.perf_counter() - start)
                assert len(hits) == 10
            assert await sink.count("docs") == n
        finally:
            await sink.close()
            await raw.close()
    figures: dict[str, Any] = {
        "points": n,
        "dimension": dim,
        "chunk": CHUNK,
        "goal_ratio": 0.8,
        "method": "raw and sink interleaved call by call (who goes first alternates) on one "
        "server, each its own graph",
        "raw": "FalkorDB's async client: UNWIND ... MERGE ... SET n += r.p, n.vector = "
        "vecf32(r.v); UNWIND ... MATCH ... SET n += r.m (nulls remove)",
        "filter": "author = 'zed' AND published >= 2020 (20% of points), limit 10",
        "upserts_per_s": {"sink": _rate(n, took["sink_new"]), "raw": _rate(n, took["raw_new"])},
        "upserts_ratio": round(took["raw_new"] / took["sink_new"], 3),
        "payload_updates_per_s": {
            "sink": _rate(n, took["sink_upd"]),
            "raw": _rate(n, took["raw_upd"]),
        },
        "payload_updates_ratio": round(took["raw_upd"] / took["sink_upd"], 3),
        "filtered_query_ms_median": {
            "sink": round(statistics.median(sink_q) * 1000, 2),
            "raw": round(statistics.median(raw_q) * 1000, 2),
        },
        "filtered_query_ms_p95": {
            "sink": round(sorted(sink_q)[94] * 1000, 2),
            "raw": round(sorted(raw_q)[94] * 1000, 2),
        },
        # the raw query returns fewer than 10 when the index yields fewer nodes than asked
        # (rewritten nodes, docs/sinks.md); the sink widens its candidates until it has 10
        "raw_query_hits_mean": round(statistics.mean(raw_hits), 2),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],  # a shared box
    }
    _write("sink-falkordb", figures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=["chroma", "falkordb"])
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--dimension", type=int, default=384)
    parser.add_argument("--modes", default="embedded,server")
    args = parser.parse_args()
    if args.kind == "falkordb":
        asyncio.run(bench_falkordb(args.points, args.dimension))
        return
    asyncio.run(bench_chroma(args.points, args.dimension, args.modes.split(",")))


if __name__ == "__main__":
    main()
