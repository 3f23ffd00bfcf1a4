"""Scale-out throughput: 1, 2 and 4 ``vectorsync worker`` processes applying the same
backlog from Redis Streams (PostgreSQL state, pgvector sink), beside the capture's publish
rate and the raw Redis rate for entries of the same size, measured in the same run.

python bench/bench_scaleout.py --embedder hash --records 20000
python bench/bench_scaleout.py --embedder sentence-transformers --records 3000

Figures go to bench/results/scaleout-<embedder>.json. Every process shares the machine's
cores with Redis and both PostgreSQL servers; a MiniLM worker runs one torch thread and
one model call at a time (``threads = 1``, ``concurrency = 1``: one core's worth).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.pgserver import pg_server
from tests.pgvector_server import pgvector_server
from tests.redis_server import redis_server

from bench_sync import WORK, _write
from vectorsync._processes import stop_process
from vectorsync.config import load_config
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


def _start(folder: Path, role: str, log: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    env["OMP_NUM_THREADS"] = "1"
    with (folder / log).open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "vectorsync", role], cwd=folder, env=env, stdout=out, stderr=out
        )


async def _until(check: Any, what: str, deadline: float = 3600) -> None:
    end = time.monotonic() + deadline
    while not await check():
        if time.monotonic() > end:
            raise TimeoutError(what)
        await asyncio.sleep(0.2)


async def _timed(
    folder: Path, workers: int, procs: list[subprocess.Popen[bytes]]
) -> tuple[float, float]:
    """Workers up and holding every partition, then the capture started: (seconds until
    it published the backlog, seconds until the workers applied it). One observing engine
    polls (opening one per poll would take a core's share)."""
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
            started = time.perf_counter()
            procs.append(_start(folder, "capture", "capture.log"))

            async def published() -> bool:
                return (await bus.captured("app"))[1] >= head

            await _until(published, "the capture publishes the backlog")
            publish_s = time.perf_counter() - started

            async def applied() -> bool:
                status = (await engine.scaleout_status()).as_dict()
                return _applied(status)

            await _until(applied, "the workers apply the backlog")
            return publish_s, time.perf_counter() - started
        finally:
            await bus.close()


def _applied(status: dict[str, Any]) -> bool:
    return all(v["depth"] == 0 for v in status["partitions"]["app"].values())


def _raw_redis(url: str, entries: int, body: bytes) -> float:
    import redis

    r = redis.Redis.from_url(url)
    started = time.perf_counter()
    pipe = r.pipeline(transaction=True)
    for i in range(entries):
        pipe.xadd("bench:raw", {"c": body})
        if i % 8 == 7:
            pipe.execute()
            pipe = r.pipeline(transaction=True)
    pipe.execute()
    return entries / (time.perf_counter() - started)


def one(embedder: str, n: int, workers: int) -> dict[str, Any]:
    folder = WORK / f"scaleout-{embedder}-{workers}"
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
        state = pg.create_database(f"scaleout_{workers}")
        (folder / "vectorsync.toml").write_text(
            CONFIG.format(
                state=state,
                sink=vec.url,
                schema=f"s{workers}",
                embedder=embedder,
                bus=bus.url,
                # one torch thread, one call at a time: a worker is one core's worth
                one_thread="threads = 1\nconcurrency = 1" if embedder != "hash" else "",
            )
        )

        async def setup() -> None:
            async with Engine.open(load_config(folder / "vectorsync.toml")) as engine:
                await engine.prepare()

        asyncio.run(setup())
        procs: list[subprocess.Popen[bytes]] = []
        try:
            publish_s, apply_s = asyncio.run(_timed(folder, workers, procs))
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                stop_process(p, timeout=30)
        change = [["docs", 123456, "insert", 123456, 1.0e9, None]]
        raw = _raw_redis(bus.url, 2000, orjson.dumps(change * (200 // 8)))
    return {
        "workers": workers,
        "records": n,
        "seconds": round(apply_s, 1),
        "records_per_s": round(n / apply_s, 1),
        "capture_publish_changes_per_s": round(n / publish_s, 1),
        "raw_redis_entries_per_s": round(raw, 1),
        "raw_redis_changes_per_s": round(raw * (200 // 8), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--embedder", default="hash")
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    runs = [one(args.embedder, args.records, w) for w in args.workers]
    base = runs[0]["records_per_s"]
    for r in runs:
        r["speedup_over_1"] = round(r["records_per_s"] / base, 2)
    _write(
        f"scaleout-{'minilm' if args.embedder != 'hash' else 'hash'}",
        {
            "embedder": args.embedder,
            "bus": "redis streams (appendfsync always), 8 partitions",
            "state": "postgresql",
            "sink": "pgvector",
            "runs": runs,
            "goal": "2 workers >= 1.7x of 1 (embedder-bound); 4 workers not below 2",
        },
    )


if __name__ == "__main__":
    main()
