"""Skeleton benchmarks; figures go to bench/results/<name>.json.

python bench/bench_sync.py content    # end-to-end content changes ÷ raw embedder rate
python bench/bench_sync.py metadata   # metadata-only changes/s, SQLite → qdrant-edge, beside
                                      # qdrant-edge set_payload alone on the same shard
python bench/bench_sync.py metadata --conflicts merge   # the same under a conflict policy
python bench/bench_sync.py rss        # peak RSS syncing 100k records (hash embedder)
python bench/bench_sync.py all
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vectorsync.config import load_config
from vectorsync.demo import stdlib_symbols
from vectorsync.embed.sentence_transformers import SentenceTransformersEmbedder
from vectorsync.engine import Engine
from vectorsync.render import Renderer

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
WORK = ROOT / "work"

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
kind = "{embedder}"
[[mappings]]
name = "docs"
source = "app"
table = "docs"
key = "id"
text = "{{{{ title }}}}\\n{{{{ body }}}}"
payload = ["author", "tags", "published"]
sink = "vectors"
"""


def _fresh(name: str, embedder: str, batch: int = 1000, mapping: str = "") -> Path:
    folder = WORK / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    db = sqlite3.connect(folder / "app.db")
    db.execute(
        "CREATE TABLE docs (id INTEGER PRIMARY KEY, title TEXT, body TEXT, author TEXT, "
        "tags TEXT, published INTEGER)"
    )
    db.commit()
    db.close()
    config = CONFIG.format(embedder=embedder, batch=batch) + mapping
    (folder / "vectorsync.toml").write_text(config)
    return folder


def _insert(folder: Path, rows: list[tuple[Any, ...]]) -> None:
    db = sqlite3.connect(folder / "app.db")
    db.executemany("INSERT INTO docs VALUES (?, ?, ?, ?, ?, ?)", rows)
    db.commit()
    db.close()


def _write(name: str, figures: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    figures = {
        "benchmark": name,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
        **figures,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


class Latencies:
    """Source commit → batch committed, per change: wraps a source's ``read_changes`` to
    note each change's commit time, and is the run's ``on_batch`` (pass it as that)."""

    def __init__(self, source: Any) -> None:
        self.seen: list[tuple[float, float]] = []  # (committed at, latency)
        self._committed: dict[int, list[float]] = {}
        read = source.read_changes

        async def observed(after: int, limit: int) -> list[Any]:
            changes = await read(after, limit)
            for c in changes:
                self._committed.setdefault(c.position, []).append(c.committed_at)
            return changes

        source.read_changes = observed

    def __call__(self, report: Any) -> None:
        now = time.time()
        for position in [p for p in self._committed if p <= report.position]:
            self.seen.extend((at, now - at) for at in self._committed.pop(position))


def percentile_ms(values: list[float], p: float) -> float:
    """The ``p`` quantile of sorted ``values`` (seconds), in ms."""
    return round(values[min(len(values) - 1, int(p * len(values)))] * 1000, 1)


async def bench_content(n: int) -> None:
    """Content changes end to end vs the bare model on the same texts, in the same run."""
    symbols = list(stdlib_symbols(n))
    rows = [
        (i, s["id"], (s["doc"] or "")[:600], "ann", s["kind"], 2020)
        for i, s in enumerate(symbols, 1)
    ]
    folder = _fresh("content", "sentence-transformers")
    config = load_config(folder / "vectorsync.toml")
    renderer = Renderer(config.mappings[0])
    texts = [
        renderer.render(
            {"title": r[1], "body": r[2], "author": "ann", "tags": r[4], "published": 2020}
        ).text
        for r in rows
    ]
    embedder = SentenceTransformersEmbedder("default")
    async with Engine.open(config, embedders={"default": embedder}) as engine:
        await engine.prepare()  # loads the model once for both measurements
        await embedder.embed(texts[:64])  # warm-up
        started = time.perf_counter()
        for i in range(0, len(texts), embedder.batch_size):
            await embedder.embed(texts[i : i + embedder.batch_size])
        raw_seconds = time.perf_counter() - started
        _insert(folder, rows)
        result = await engine.run(once=True)
    raw_rate = len(texts) / raw_seconds
    e2e_rate = result.changes / result.seconds
    _write(
        "content",
        {
            "records": len(rows),
            "embedder": embedder.model_id,
            "raw_embedder_texts_per_s": round(raw_rate, 1),
            "end_to_end_changes_per_s": round(e2e_rate, 1),
            "ratio_end_to_end_over_raw": round(e2e_rate / raw_rate, 3),
            "goal_ratio": 0.90,
            "embedded": result.counts.get("embedded"),
        },
    )


async def bench_metadata(n: int, conflicts: str = "source_wins") -> None:
    """Metadata-only updates SQLite → qdrant-edge: a distinct value per row, then one value
    for every row (updates that set the same values share a sink call). With another
    ``conflicts`` policy each batch reads its points with their vectors first
    (docs/conflicts.md): results/metadata-<policy>.json."""
    name = "metadata" if conflicts == "source_wins" else f"metadata-{conflicts}"
    policy = f'conflicts = "{conflicts}"\n' if conflicts != "source_wins" else ""
    if conflicts == "latest_wins":
        policy += 'conflict_timestamp = "published"\n'
    folder = _fresh(name, "hash", mapping=policy)
    _insert(
        folder,
        [(i, f"title {i}", f"body of record {i}", "ann", "a", 2020) for i in range(1, n + 1)],
    )
    config = load_config(folder / "vectorsync.toml")
    async with Engine.open(config) as engine:
        initial = await engine.run(once=True)
        db = sqlite3.connect(folder / "app.db")
        db.execute("UPDATE docs SET author = 'author-' || id, published = published + 1")
        db.commit()
        db.close()
        result_cpu = time.process_time()
        result = await engine.run(once=True)
        result_cpu = time.process_time() - result_cpu
        db = sqlite3.connect(folder / "app.db")  # one value for every row: a status flip
        db.execute("UPDATE docs SET tags = 'archived'")
        db.commit()
        db.close()
        same = await engine.run(once=True)
        sink_alone = await _edge_payloads_alone(engine, n) if conflicts == "source_wins" else {}
    assert result.counts.get("payload_only") == n and not result.counts.get("embedded")
    rate = n / result.seconds
    assert same.counts.get("payload_only") == n and not same.counts.get("embedded")
    _write(
        name,
        {
            "records": n,
            "conflicts": conflicts,
            "initial_sync_per_s": round(initial.changes / initial.seconds, 1),
            "metadata_changes": result.changes,
            "metadata_changes_per_s": round(result.changes / result.seconds, 1),
            "same_value_changes_per_s": round(same.changes / same.seconds, 1),
            "goal_per_s": 25000,
            "embedded": result.counts.get("embedded", 0),
            "cpu_us_per_change": round(result_cpu / n * 1e6, 1),
            **sink_alone,
            **(
                {"ratio_over_sink_alone": round(rate / sink_alone["sink_alone_per_s"], 3)}
                if sink_alone
                else {}
            ),
        },
    )


async def _edge_payloads_alone(engine: Engine, n: int) -> dict[str, Any]:
    """The same kind of change made with qdrant-edge's own API on the run's own shard (its
    points and payload indexes): one ``set_payload`` per point of the fields a distinct
    metadata change sets (the mapped fields that changed and ``_vs_version``), after the
    ``retrieve`` that finds which points exist. What the sink allows, nothing else."""
    import qdrant_edge as qe

    from vectorsync.model import point_id
    from vectorsync.sinks.qdrant_edge import QdrantEdgeSink

    sink = engine.sinks["vectors"]
    assert isinstance(sink, QdrantEdgeSink)
    [collection] = await sink.collections()
    shard = sink._shard(collection)  # the same shard, written with qdrant-edge's own API
    ids: list[Any] = [point_id("docs", i) for i in range(1, n + 1)]
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(0, n, 1000):
        shard.retrieve(ids[i : i + 1000], with_payload=False, with_vector=False)
    for i, pid in enumerate(ids, 1):
        fields = {"author": f"raw-{i}", "published": 2030, "_vs_version": 10**9 + i}
        shard.update(qe.UpdateOperation.set_payload([pid], fields))
    seconds, cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "sink_alone_per_s": round(n / seconds, 1),
        "sink_alone_cpu_us_per_change": round(cpu_s / n * 1e6, 1),
        "sink_alone": "qdrant-edge set_payload per point (3 fields, 2 indexed) + retrieve",
    }


async def _rss_child(n: int) -> None:
    folder = _fresh("rss", "hash")
    batch = 20_000
    for start in range(1, n + 1, batch):
        _insert(
            folder,
            [
                (i, f"title {i}", f"body of record {i} " * 8, "ann", "a", 2020)
                for i in range(start, min(n, start + batch - 1) + 1)
            ],
        )
    config = load_config(folder / "vectorsync.toml")
    async with Engine.open(config) as engine:
        result = await engine.run(once=True)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "records": result.changes,
                "seconds": round(result.seconds, 1),
                "peak_rss_mib": round(peak_kib / 1024, 1),
            }
        )
    )


def bench_rss(n: int) -> None:
    """Peak RSS of a separate process that syncs n records (so this process doesn't count)."""
    done = subprocess.run(
        [sys.executable, __file__, "rss-child", "--records", str(n)],
        capture_output=True,
        text=True,
        check=True,
    )
    child = json.loads(done.stdout.strip().splitlines()[-1])
    _write(
        "rss",
        {
            **child,
            "embedder": "hash",
            "records_per_s": round(child["records"] / child["seconds"], 1),
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("which", choices=["content", "metadata", "rss", "rss-child", "all"])
    parser.add_argument("--records", type=int, default=0)
    parser.add_argument(
        "--conflicts",
        default="source_wins",
        choices=["source_wins", "latest_wins", "merge", "keep_both"],
        help="metadata: the mapping's conflict policy",
    )
    args = parser.parse_args()
    if args.which in ("content", "all"):
        asyncio.run(bench_content(args.records or 800))
    if args.which in ("metadata", "all"):
        asyncio.run(bench_metadata(args.records or 50_000, args.conflicts))
    if args.which in ("rss", "all"):
        bench_rss(args.records or 100_000)
    if args.which == "rss-child":
        asyncio.run(_rss_child(args.records))


if __name__ == "__main__":
    main()
