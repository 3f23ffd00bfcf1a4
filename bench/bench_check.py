"""Consistency-check benchmarks; figures go to bench/results/check-<n>.json.

python bench/bench_check.py --records 100000
python bench/bench_check.py --records 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_sync import _fresh, _insert, _write
from vectorsync.config import load_config
from vectorsync.engine import Engine
from vectorsync.model import PayloadUpdate, point_id


async def bench(n: int) -> None:
    folder = _fresh(f"check-{n}", "hash", batch=5000)
    for start in range(1, n + 1, 50_000):
        stop = min(n, start + 49_999)
        _insert(
            folder,
            [
                (i, f"title {i}", f"body of record {i}", "ann", "a", 2020)
                for i in range(start, stop + 1)
            ],
        )
    config = load_config(folder / "vectorsync.toml")
    figures: dict[str, Any] = {"records": n}
    async with Engine.open(config) as engine:
        started = time.perf_counter()
        await engine.run(once=True)
        figures["initial_sync_seconds"] = round(time.perf_counter() - started, 1)
        for mode in ("prove", "full", "quick"):
            report = await engine.check("docs", mode=mode)
            assert report.consistent, report.counts
            figures[f"{mode}_in_sync_seconds"] = round(report.seconds, 2)
        sample = await engine.check("docs", mode="sample", sample_size=1000, seed=1)
        figures["sample_1000_seconds"] = round(sample.seconds, 2)
        drifted = random.Random(7).sample(range(1, n + 1), 100)
        sink = engine.sinks["vectors"]
        await sink.update_payloads(
            "docs",
            [
                PayloadUpdate(id=point_id("docs", k), set={"author": "drifted"}, payload={})
                for k in drifted
            ],
        )
        report = await engine.check("docs")
        found = set(report.keys("payload_mismatch"))
        db_path = folder / "app.db"
        with sqlite3.connect(db_path) as db:  # 100 rows edited behind the engine's back
            db.execute("DROP TRIGGER _vectorsync_docs_upd")
            db.executemany("UPDATE docs SET body = 'edited' WHERE id = ?", [(k,) for k in drifted])
        proved = await engine.check("docs", mode="prove")
        figures["prove_find_100_edited_rows_seconds"] = round(proved.seconds, 2)
        figures["prove_found_exactly"] = set(proved.keys("stale")) == set(drifted)
        figures["find_100_drifted_seconds"] = round(report.seconds, 2)
        figures["drifted_found_exactly"] = found == set(drifted)
        figures["buckets_differing"] = report.details["buckets_differing"]
    figures["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    figures["full_check_process"] = _full_check_process(folder)
    figures["goals"] = {
        "prove_in_sync_1M_seconds": 5,
        "full_verify_100k_seconds": 10,
        "full_check_1M_seconds": 10,
        "full_check_1M_peak_rss_mib": 1024,
    }
    _write(f"check-{n}", figures)


def _full_check_process(folder: Path) -> dict[str, Any]:
    """``vectorsync check --mode full`` as a user runs it: its own process (it opens the
    sink and the state store itself), its wall and CPU time and the peak RSS of that process
    alone. It runs last, so it finds the 100 rows edited behind the engine's back."""
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vectorsync",
            "check",
            "--mapping",
            "docs",
            "--mode",
            "full",
            "--json",
        ],
        cwd=folder,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):  # 1: drift found (the 100 rows edited behind its back)
        raise SystemExit(f"check failed ({done.returncode}): {done.stderr[-2000:]}")
    report = json.loads(done.stdout)["checks"][0]["before"]
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "wall_seconds": round(seconds, 2),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "check_seconds": report["seconds"],
        "drift_found": report["counts"],
        "peak_rss_mib": round(usage.ru_maxrss / 1024),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100_000)
    asyncio.run(bench(parser.parse_args().records))


if __name__ == "__main__":
    main()
