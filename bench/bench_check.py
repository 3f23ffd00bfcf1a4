"""Consistency-check benchmarks; figures go to bench/results/check-<n>.json.

python bench/bench_check.py --records 100000
python bench/bench_check.py --records 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import vectorsync
from bench_sync import _fresh, _insert, _write
from vectorsync.config import load_config
from vectorsync.engine import Engine
from vectorsync.model import PayloadUpdate, point_id

MODES = ("prove", "full", "quick")


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
    in_process: dict[str, Any] = {}
    async with Engine.open(config) as engine:
        started = time.perf_counter()
        await engine.run(once=True)
        figures["initial_sync_seconds"] = round(time.perf_counter() - started, 1)
        figures["peak_rss_after_initial_sync_mib"] = _status()["VmHWM"]
        for mode in MODES:
            before = _status()
            _reset_peak()
            report = await engine.check("docs", mode=mode)
            assert report.consistent, report.counts
            figures[f"{mode}_in_sync_seconds"] = round(report.seconds, 2)
            in_process[mode] = {
                "rss_before_mib": before["VmRSS"],
                "peak_rss_mib": _status()["VmHWM"],
                "peak_rss_added_mib": _status()["VmHWM"] - before["VmRSS"],
            }
    # each mode as a user runs it, its own process, while nothing else holds the sink
    figures["process_in_sync"] = {mode: _check_process(folder, mode) for mode in MODES}
    figures["process_open_sink_only"] = _open_only_process(folder)
    async with Engine.open(config) as engine:
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
    figures["in_process_check_rss"] = {
        "note": "the bench's own process after the initial sync: the peak is reset before "
        "each check (/proc/self/clear_refs), so it is the check's peak, on top of what "
        "the open engine and its loaded qdrant-edge shard already hold",
        **in_process,
    }
    figures["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    figures["full_check_process"] = _check_process(folder, "full")
    figures["goals"] = {
        "prove_in_sync_1M_seconds": 5,
        "full_verify_100k_seconds": 10,
        "full_check_1M_seconds": 10,
        "full_check_1M_peak_rss_mib": 1024,
    }
    _write(f"check-{n}", figures)


def _status(pid: int | str = "self") -> dict[str, int]:
    """Memory figures of a process from /proc (MiB): VmRSS, VmHWM (its peak), RssAnon
    (private memory), RssFile (file pages mapped, such as qdrant-edge's vector files)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[name] = round(int(value.split()[0]) / 1024)
    return out


def _reset_peak() -> None:
    """Start VmHWM afresh at the current RSS (Linux: 5 > clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def _watch(
    command: list[str], folder: Path
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run a process and sample its /proc status until it ends: its own peak RSS (VmHWM,
    not the parent's: getrusage(RUSAGE_CHILDREN) counts what a child inherited at fork)
    and the most private and file-backed memory seen."""
    started = time.perf_counter()
    # the child imports the vectorsync this bench imported (a relative PYTHONPATH would
    # not survive its working folder)
    here = str(Path(vectorsync.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen(
        command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    peak = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    cpu = 0.0
    while child.poll() is None:
        try:
            status = _status(child.pid)
            ticks = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            break
        for name in peak:
            peak[name] = max(peak[name], status.get(name, 0))
        cpu = (int(ticks[11]) + int(ticks[12])) / os.sysconf("SC_CLK_TCK")
        time.sleep(0.02)  # sampling, not synchronisation
    out, err = child.communicate()
    done = subprocess.CompletedProcess(command, child.returncode, out, err)
    return done, {
        "wall_seconds": round(time.perf_counter() - started, 2),
        "cpu_seconds": round(cpu, 2),
        "peak_rss_mib": peak["VmHWM"],
        "peak_private_mib": peak["RssAnon"],
        "peak_file_backed_mib": peak["RssFile"],
    }


def _check_process(folder: Path, mode: str) -> dict[str, Any]:
    """``vectorsync check --mode <mode>`` as a user runs it: its own process (it opens the
    sink and the state store itself), its wall and CPU time and its own peak RSS. The
    last full check finds the 100 rows edited behind the engine's back."""
    command = [sys.executable, "-m", "vectorsync", "check", "--mapping", "docs"]
    done, figures = _watch([*command, "--mode", mode, "--json"], folder)
    if done.returncode not in (0, 1):  # 1: drift found (the 100 rows edited behind its back)
        raise SystemExit(f"check failed ({done.returncode}): {done.stderr[-2000:]}")
    report = json.loads(done.stdout)["checks"][0]["before"]
    return {"check_seconds": report["seconds"], "drift_found": report["counts"], **figures}


_OPEN_ONLY = """
import asyncio
from vectorsync.config import load_config
from vectorsync.engine import Engine

async def main():
    async with Engine.open(load_config("vectorsync.toml")) as engine:
        await engine.checker("docs")  # opens the sink and loads the collection

asyncio.run(main())
"""


def _open_only_process(folder: Path) -> dict[str, Any]:
    """What a process holds that only opens the engine and loads the collection (as every
    check does before reading a record): the floor under a check process's peak RSS."""
    done, figures = _watch([sys.executable, "-c", _OPEN_ONLY], folder)
    if done.returncode != 0:
        raise SystemExit(f"open failed ({done.returncode}): {done.stderr[-2000:]}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100_000)
    asyncio.run(bench(parser.parse_args().records))


if __name__ == "__main__":
    main()
