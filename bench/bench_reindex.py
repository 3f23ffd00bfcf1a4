"""Re-index benchmark: a backfill's throughput ÷ the raw embedder's on the same texts, in
the same process; figures go to bench/results/reindex-<embedder>.json.

python bench/bench_reindex.py                      # hash embedder, 20,000 records
python bench/bench_reindex.py --records 100000
python bench/bench_reindex.py --embedder minilm --records 2000

A template change (title and body swapped) makes every text new, so the backfill embeds
every record (no cache hit): the ratio is what the pipeline around the embedder costs
(keyset scan, re-read, render, sink writes, state commits). The verification and swap
after the backfill are timed apart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_sync import _write
from vectorsync.config import load_config
from vectorsync.embed.base import Embedder
from vectorsync.embed.hash import HashEmbedder
from vectorsync.engine import Engine
from vectorsync.render import Renderer
from vectorsync.worker import BatchReport

WORK = Path(__file__).resolve().parent / "work"
WORDS = ["alpha", "beta", "gamma", "delta", "vector", "graph", "sync", "chunk", "entity"]

CONFIG = """\
[state]
url = "sqlite:///.vectorsync/state.db"
[sync]
batch_size = {batch}
[sources.app]
kind = "sqlite"
path = "app.db"
[sinks.vectors]
kind = "qdrant-edge"
path = ".vectorsync/qdrant"
[embedders.default]
{embedder}
[[mappings]]
name = "docs"
source = "app"
table = "docs"
key = "id"
text = "{text}"
payload = ["author", "tags", "published"]
sink = "vectors"
"""
BEFORE, AFTER = "{{ title }}\\n{{ body }}", "{{ body }}\\n{{ title }}"
EMBEDDERS = {"hash": 'kind = "hash"', "minilm": 'kind = "sentence-transformers"\nthreads = 1'}


def _project(name: str, records: int) -> Path:
    folder = WORK / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = random.Random(records)
    db = sqlite3.connect(folder / "app.db")
    db.execute(
        "CREATE TABLE docs (id INTEGER PRIMARY KEY, title TEXT, body TEXT, author TEXT, "
        "tags TEXT, published INTEGER)"
    )
    db.executemany(
        "INSERT INTO docs VALUES (?, ?, ?, ?, ?, ?)",
        [
            (i, f"title {i}", " ".join(rng.choices(WORDS, k=12)), "ann", "a", 2020)
            for i in range(1, records + 1)
        ],
    )
    db.commit()
    db.close()
    return folder


def _configure(folder: Path, embedder: str, text: str, batch: int) -> Path:
    path = folder / "vectorsync.toml"
    path.write_text(CONFIG.format(embedder=EMBEDDERS[embedder], text=text, batch=batch))
    return path


def _texts(folder: Path, config_path: Path) -> list[str]:
    renderer = Renderer(load_config(config_path).mappings[0])
    db = sqlite3.connect(folder / "app.db")
    cols = ("id", "title", "body", "author", "tags", "published")
    rows = [dict(zip(cols, r, strict=True)) for r in db.execute("SELECT * FROM docs")]
    db.close()
    return [renderer.render(r).text for r in rows]


async def _raw_rate(embedder: Embedder, texts: list[str]) -> float:
    await embedder.embed(texts[:64])  # warm-up
    started = time.perf_counter()
    for i in range(0, len(texts), embedder.batch_size):
        await embedder.embed(texts[i : i + embedder.batch_size])
    return len(texts) / (time.perf_counter() - started)


async def bench(embedder_kind: str, records: int, batch: int) -> dict[str, Any]:
    folder = _project(f"reindex-{embedder_kind}", records)
    cwd = Path.cwd()
    os.chdir(folder)  # the config's relative paths
    try:
        _configure(folder, embedder_kind, BEFORE, batch)
        # the first sync in a process of its own: this one's peak RSS is the re-index's
        subprocess.run([sys.executable, "-m", "vectorsync", "run", "--once"], check=True)
        second = _configure(folder, embedder_kind, AFTER, batch)
        texts = _texts(folder, second)
        pages: list[tuple[float, int]] = []  # (commit time, records done)

        anon: list[int] = []  # RssAnon after each page: the process's own memory

        def on_batch(report: BatchReport) -> None:
            if report.backfill is not None:
                pages.append((time.perf_counter(), report.backfill["done"]))
                anon.append(_rss_anon_mib())

        async with Engine.open(load_config(second)) as engine:
            await engine.prepare()  # builds version 2's target; loads the model once
            embedder = engine.embedders["default"]
            raw = await _raw_rate(embedder, texts)
            if isinstance(embedder, HashEmbedder):
                embedder.texts_embedded = 0
            idle = await _search_latencies(engine, 100)
            rss_before = _peak_rss_mib()
            started = time.perf_counter()
            searching = asyncio.Event()
            reader = asyncio.create_task(_search_while(engine, searching))
            result = await engine.run(once=True, on_batch=on_batch)
            finished = time.perf_counter()
            searching.set()
            during = await reader
            listed = await engine.indexes("docs")
    finally:
        os.chdir(cwd)
    assert [v["state"] for v in listed] == ["previous", "live"], listed
    backfill_seconds = pages[-1][0] - started
    rate = records / backfill_seconds
    return {
        "embedder": embedder_kind,
        "records": records,
        "batch_size": batch,
        "pages": len(pages),
        "raw_embed_texts_per_s": round(raw, 1),
        "backfill_records_per_s": round(rate, 1),
        "ratio": round(rate / raw, 3),
        "backfill_seconds": round(backfill_seconds, 2),
        "verify_and_swap_seconds": round(finished - pages[-1][0], 2),
        "run_seconds": round(result.seconds, 2),
        "embedded": result.counts.get("embedded", 0),
        "search_ms_idle": _percentiles(idle),
        "search_ms_during_reindex": _percentiles(during),
        "peak_rss_mib_before_reindex": rss_before,
        "peak_rss_mib_after_reindex": _peak_rss_mib(),
        # RSS counts the sink's memory-mapped segment files too (qdrant-edge writes through
        # mmap): the anonymous part is what the backfill itself holds
        "rss_anon_mib_during_backfill": {
            "first_page": anon[0] if anon else None,
            "max": max(anon, default=None),
            "last_page": anon[-1] if anon else None,
        },
    }


async def _search_latencies(engine: Engine, n: int) -> list[float]:
    times = []
    for i in range(n):
        started = time.perf_counter()
        hits = await engine.search("docs", f"{WORDS[i % len(WORDS)]} sync", limit=5)
        times.append((time.perf_counter() - started) * 1000)
        assert hits, "a search found nothing"
    return times


async def _search_while(engine: Engine, done: asyncio.Event) -> list[float]:
    """A reader searching every 50 ms until ``done``: its latencies (ms)."""
    times: list[float] = []
    while not done.is_set():
        times += await _search_latencies(engine, 1)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 0.05)
    return times


def _percentiles(ms: list[float]) -> dict[str, float]:
    ordered = sorted(ms)
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)  # noqa: E731
    return {"searches": len(ordered), "p50": pick(0.5), "p99": pick(0.99), "max": pick(1.0)}


def _rss_anon_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return round(int(line.split()[1]) / 1024)
    return 0


def _peak_rss_mib() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--embedder", choices=sorted(EMBEDDERS), default="hash")
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1000, help="sync.batch_size")
    args = parser.parse_args()
    figures = asyncio.run(bench(args.embedder, args.records, args.batch))
    _write(f"reindex-{args.embedder}", figures)


if __name__ == "__main__":
    main()
