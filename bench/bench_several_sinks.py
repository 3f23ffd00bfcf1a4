"""One mapping to qdrant-edge + Chroma + FalkorDB, FalkorDB cut off for a while under load.

python bench/bench_several_sinks.py [--rate 400] [--outage 60]
    → bench/results/several-sinks-outage.json
python bench/bench_several_sinks.py added --records 10000
    → bench/results/several-sinks-added.json

A writer commits ``rate`` changes/s to SQLite (half text edits, half metadata-only) for
``before + outage + after`` seconds; FalkorDB sits behind a TCP proxy that is cut for
``outage`` seconds. Measured: source commit → batch committed (the other two sinks
written) for the changes committed while FalkorDB was down, the backlog it built, how
long it took to catch up once back, and a full check of each sink at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.tcp_proxy import tcp_proxy

from bench_sync import Latencies, _fresh, _insert, _write, percentile_ms
from vectorsync.config import load_config
from vectorsync.engine import Engine
from vectorsync.falkordb_server import falkordb_server


def _writer(db: Path, n: int, rate: float, seconds: float) -> dict[str, Any]:
    per_txn = max(2, int(rate / 50))
    rng = random.Random(7)
    done = 0
    conn = sqlite3.connect(db, timeout=30)
    started = tick = time.monotonic()
    while time.monotonic() - started < seconds:
        keys = rng.sample(range(1, n + 1), per_txn)
        half = per_txn // 2
        marks = ",".join("?" * half)
        conn.execute(f"UPDATE docs SET body = body || ' +' WHERE id IN ({marks})", keys[:half])
        marks = ",".join("?" * (per_txn - half))
        conn.execute(
            f"UPDATE docs SET published = published + 1 WHERE id IN ({marks})", keys[half:]
        )
        conn.commit()
        done += per_txn
        tick += 0.02
        time.sleep(max(0.0, tick - time.monotonic()))  # pacing the load (a benchmark)
    conn.close()
    return {"changes": done, "seconds": time.monotonic() - started}


async def bench(n: int, rate: float, before: float, outage: float, after: float) -> None:
    with falkordb_server() as graph_server, tcp_proxy(graph_server.url) as proxy:
        folder = _fresh("several-sinks", "hash", batch=500)
        url = proxy.url_for(graph_server.url)
        toml = folder / "vectorsync.toml"
        text = toml.read_text().replace('sink = "vectors"', 'sinks = ["vectors", "docs", "graph"]')
        text = text.replace(
            "[embedders.default]",
            '[sinks.docs]\nkind = "chroma"\npath = ".vectorsync/chroma"\n'
            f'[sinks.graph]\nkind = "falkordb"\nurl = "{url}"\ngraph = "bench"\n'
            "[embedders.default]",
        )
        text = text.replace("[sync]\n", "[sync]\nsink_outage_after = 1.0\n")
        toml.write_text(text)
        _insert(folder, [(i, f"t {i}", f"body {i}", "ann", "a", 2020) for i in range(1, n + 1)])
        config = load_config(toml)
        backlog_max = 0
        async with Engine.open(config) as engine:
            await engine.run(once=True)
            on_batch = Latencies(engine.sources["app"])
            halt = asyncio.Event()
            run = asyncio.create_task(engine.run(stop=halt, on_batch=on_batch))
            total = before + outage + after
            writer = asyncio.create_task(
                asyncio.to_thread(_writer, folder / "app.db", n, rate, total)
            )
            await asyncio.sleep(before)
            cut_at = time.time()
            proxy.cut()
            while time.time() - cut_at < outage:
                backlog_max = max(backlog_max, sum((await engine.state.backlog_counts()).values()))
                await asyncio.sleep(1.0)
            proxy.restore()
            back_at = time.time()
            while await engine.state.backlog_counts():
                await asyncio.sleep(0.2)
            caught_up_s = time.time() - back_at
            wrote = await writer
            await engine.wait_for(await engine.head(), timeout=120)
            halt.set()
            await run
            checks = {m.name: (await engine.check(m.name)).consistent for m in config.mappings}
    down = sorted(lat for at, lat in on_batch.seen if cut_at + 2.0 <= at <= back_at)
    up = sorted(lat for at, lat in on_batch.seen if at < cut_at)
    pct = percentile_ms

    _write(
        "several-sinks-outage",
        {
            "records": n,
            "sinks": ["qdrant-edge", "chroma (embedded)", "falkordb (cut off)"],
            "mix": "half text edits (hash embedder), half metadata-only",
            "target_changes_per_s": rate,
            "achieved_changes_per_s": round(wrote["changes"] / wrote["seconds"], 1),
            "sink_outage_after_s": 1.0,
            "outage_s": outage,
            "while_down": {
                "changes_measured": len(down),
                "note": "commit → batch committed with qdrant-edge and Chroma written, for "
                "changes committed from 2 s after the cut until the graph was back",
                "p50_ms": pct(down, 0.5),
                "p99_ms": pct(down, 0.99),
                "max_ms": round(down[-1] * 1000, 1),
                "goal_lag_ms": 2000,
            },
            "before_the_cut": {
                "changes_measured": len(up),
                "p50_ms": pct(up, 0.5),
                "p99_ms": pct(up, 0.99),
            },
            "backlog_max_records": backlog_max,
            "catch_up_seconds": round(caught_up_s, 1),
            "consistent_after": checks,
        },
    )


async def bench_added(n: int) -> None:
    """A Chroma sink added to a mapping that already has ``n`` records in qdrant-edge,
    while a live change streams: what the backfill embeds, and how long it takes."""
    folder = _fresh("sink-added", "hash", batch=1000)
    _insert(folder, [(i, f"t {i}", f"body {i}", "ann", "a", 2020) for i in range(1, n + 1)])
    toml = folder / "vectorsync.toml"
    config = load_config(toml)
    async with Engine.open(config) as engine:
        first = await engine.run(once=True)
    toml.write_text(
        toml.read_text()
        .replace('sink = "vectors"', 'sinks = ["vectors", "docs"]')
        .replace(
            "[embedders.default]",
            '[sinks.docs]\nkind = "chroma"\npath = ".vectorsync/chroma"\n[embedders.default]',
        )
    )
    db = sqlite3.connect(folder / "app.db")
    db.execute("UPDATE docs SET body = 'a live change' WHERE id = 1")
    db.commit()
    db.close()
    config = load_config(toml)
    async with Engine.open(config) as engine:
        embedder = engine.embedders["default"]
        before = embedder.texts_embedded
        started = time.perf_counter()
        added = await engine.run(once=True)
        seconds = time.perf_counter() - started
        embedded = embedder.texts_embedded - before
        checks = {m.name: (await engine.check(m.name)).consistent for m in config.mappings}
    _write(
        "several-sinks-added",
        {
            "records": n,
            "initial_sync_seconds": round(first.seconds, 1),
            "added_sink": "chroma (embedded)",
            "backfill_seconds": round(seconds, 1),
            "backfill_records_per_s": round(n / seconds, 1),
            "texts_embedded": embedded,
            "note": "one live text change beside the backfill: the only text embedded; the "
            "backfill's vectors come from the embedding cache",
            "cache_hits": added.counts.get("cache_hits", 0),
            "consistent_after": checks,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("which", nargs="?", choices=["outage", "added"], default="outage")
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=400)
    parser.add_argument("--before", type=float, default=10)
    parser.add_argument("--outage", type=float, default=60)
    parser.add_argument("--after", type=float, default=10)
    args = parser.parse_args()
    if args.which == "added":
        asyncio.run(bench_added(args.records))
    else:
        asyncio.run(bench(args.records, args.rate, args.before, args.outage, args.after))


if __name__ == "__main__":
    main()
