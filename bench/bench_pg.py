"""PostgreSQL benchmarks; figures go to bench/results/pg-<name>.json.

python bench/bench_pg.py metadata   # metadata-only changes/s, PG logical → qdrant-edge,
                                    # plus decode rate ÷ raw pgoutput streaming rate
python bench/bench_pg.py latency    # commit → written latency at a sustained 2,000 changes/s
python bench/bench_pg.py all

Each run starts its own throwaway PostgreSQL 15 cluster (wal_level=logical) and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import select
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.pgserver import PgServer, pg_server

from bench_sync import WORK, Latencies, _write, percentile_ms
from vectorsync.config import load_config
from vectorsync.engine import Engine
from vectorsync.sources.pgoutput import Decoder, Transaction

CONFIG = """\
[state]
url = "sqlite:///.vectorsync/state.db"
[sync]
batch_size = {batch}
[sources.app]
kind = "postgres"
url = "{url}"
capture = "logical"
poll_interval = 0.05
[sinks.vectors]
kind = "qdrant-edge"
path = ".vectorsync/qdrant"
[embedders.default]
kind = "hash"
[[mappings]]
name = "docs"
source = "app"
table = "docs"
key = "id"
text = "{{{{ title }}}}\\n{{{{ body }}}}"
payload = ["author", "tags", "published"]
sink = "vectors"
"""
END = b"bench-end"
DDL = (
    "CREATE TABLE docs (id integer PRIMARY KEY, title text, body text, author text, "
    "tags text, published integer)"
)


def _project(server: PgServer, name: str, n: int, batch: int = 1000) -> tuple[Path, str]:
    folder = WORK / f"pg-{name}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    url = server.create_database(name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(DDL)
        conn.execute(
            "INSERT INTO docs SELECT i, 'title ' || i, 'body of record ' || i, 'ann', 'a', 2020 "
            "FROM generate_series(1, %s) AS i",
            (n,),
        )
    (folder / "vectorsync.toml").write_text(CONFIG.format(url=url, batch=batch))
    return folder, url


def _stream(url: str, slot: str, on_message: Callable[[bytes], None]) -> float:
    """Stream a slot from its start to the ``END`` logical message; seconds spent."""
    import psycopg2
    import psycopg2.extras

    conn = psycopg2.connect(url, connection_factory=psycopg2.extras.LogicalReplicationConnection)
    try:
        cur = conn.cursor()
        cur.start_replication(
            slot_name=slot,
            decode=False,
            options={
                "proto_version": "1",
                "publication_names": "vectorsync_app",
                "messages": "true",
            },
        )
        started = time.perf_counter()
        while True:
            msg = cur.read_message()
            if msg is None:
                select.select([cur], [], [], 0.05)
                continue
            on_message(msg.payload)
            if msg.payload[:1] == b"M" and END in msg.payload:
                return time.perf_counter() - started
    finally:
        conn.close()


async def bench_metadata(n: int) -> None:
    """Metadata-only updates (a distinct value per row, in transactions of 1,000 rows)
    end to end; then the same WAL streamed raw and through our decoder, from two slots
    created before the updates."""
    with pg_server() as server:
        folder, url = _project(server, "bench_metadata", n)
        config = load_config(folder / "vectorsync.toml")
        async with Engine.open(config) as engine:
            initial = await engine.run(once=True)
            with psycopg.connect(url, autocommit=True) as conn:
                for slot in ("bench_raw", "bench_decode"):
                    conn.execute(
                        "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,)
                    )
                for start in range(1, n + 1, 1000):
                    conn.execute(
                        "UPDATE docs SET author = 'author-' || id, published = published + 1 "
                        "WHERE id BETWEEN %s AND %s",
                        (start, start + 999),
                    )
                conn.execute("SELECT pg_logical_emit_message(false, %s, '')", (END.decode(),))
            result = await engine.run(once=True)
        assert result.counts.get("payload_only") == n and not result.counts.get("embedded")

        raw = {"messages": 0, "bytes": 0}

        def count(payload: bytes) -> None:
            raw["messages"] += 1
            raw["bytes"] += len(payload)

        raw_seconds = _stream(url, "bench_raw", count)
        txns: list[Transaction] = []
        decoder = Decoder({"docs": "id"}, "vectorsync_app", txns.append, lambda _l, _m: None)
        decode_seconds = _stream(url, "bench_decode", decoder.feed)
        decoded = sum(len(t.changes) for t in txns)
        assert decoded >= n, decoded
    _write(
        "pg-metadata",
        {
            "records": n,
            "capture": "logical",
            "initial_sync_per_s": round(initial.changes / initial.seconds, 1),
            "metadata_changes": result.changes,
            "metadata_changes_per_s": round(result.changes / result.seconds, 1),
            "goal_per_s": 25000,
            "embedded": result.counts.get("embedded", 0),
            "raw_pgoutput_messages": raw["messages"],
            "raw_pgoutput_mib": round(raw["bytes"] / 2**20, 1),
            "raw_stream_changes_per_s": round(n / raw_seconds, 1),
            "decode_changes_per_s": round(decoded / decode_seconds, 1),
            "ratio_decode_over_raw": round(raw_seconds / decode_seconds, 3),
            "goal_ratio": 0.6,
        },
    )


def _writer(url: str, n: int, rate: float, seconds: float, stop: threading.Event) -> dict[str, Any]:
    """Commit ``rate`` changes/s for ``seconds``: every 10 ms a transaction of rate/100
    updates, half of them text edits (re-embedded), half metadata-only."""
    per_txn = max(1, int(rate / 100))
    rng = random.Random(7)
    done = 0
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.monotonic()
        tick = started
        while not stop.is_set() and time.monotonic() - started < seconds:
            keys = rng.sample(range(1, n + 1), per_txn)
            half = per_txn // 2
            with conn.transaction():
                conn.execute(
                    "UPDATE docs SET body = body || ' +' WHERE id = ANY(%s)", (keys[:half],)
                )
                conn.execute(
                    "UPDATE docs SET published = published + 1 WHERE id = ANY(%s)",
                    (keys[half:],),
                )
            done += per_txn
            tick += 0.01
            delay = tick - time.monotonic()
            if delay > 0:
                stop.wait(delay)
        elapsed = time.monotonic() - started
    return {"changes": done, "seconds": elapsed}


async def bench_latency(n: int, rate: float, seconds: float) -> None:
    """Source commit (the server's commit timestamp in the pgoutput stream) → the batch's
    sink writes acknowledged and its state committed, per change, while a writer commits
    ``rate`` changes/s. The sink write is visible before the state commit, so these
    figures are an upper bound on commit → searchable."""
    with pg_server() as server:
        folder, url = _project(server, "bench_latency", n, batch=1000)
        config = load_config(folder / "vectorsync.toml")
        async with Engine.open(config) as engine:
            await engine.run(once=True)
            on_batch = Latencies(engine.sources["app"])
            stop = threading.Event()
            halt = asyncio.Event()
            run = asyncio.create_task(engine.run(stop=halt, on_batch=on_batch))
            writer = asyncio.create_task(asyncio.to_thread(_writer, url, n, rate, seconds, stop))
            try:
                wrote = await writer
                position = await engine.head()
                await engine.wait_for(position, timeout=60)
            finally:
                stop.set()
                halt.set()
                await run
    latencies = sorted(lat for _, lat in on_batch.seen)

    def pct(p: float) -> float:
        return percentile_ms(latencies, p)

    _write(
        "pg-latency" if rate == 2000 else f"pg-latency-{int(rate)}",
        {
            "records": n,
            "capture": "logical",
            "mix": "half text edits (hash embedder), half metadata-only",
            "target_changes_per_s": rate,
            "achieved_changes_per_s": round(wrote["changes"] / wrote["seconds"], 1),
            "seconds": round(wrote["seconds"], 1),
            "changes_measured": len(latencies),
            "p50_ms": pct(0.50),
            "p90_ms": pct(0.90),
            "p99_ms": pct(0.99),
            "max_ms": round(latencies[-1] * 1000, 1),
            "goal_p99_ms": 250 if rate <= 2000 else 100,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("which", choices=["metadata", "latency", "all"])
    parser.add_argument("--records", type=int, default=0)
    parser.add_argument("--rate", type=float, default=2000)
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()
    if args.which in ("metadata", "all"):
        asyncio.run(bench_metadata(args.records or 50_000))
    if args.which in ("latency", "all"):
        asyncio.run(bench_latency(args.records or 20_000, args.rate, args.seconds))


if __name__ == "__main__":
    main()
