"""Pipeline speed: new-record ingest ÷ the serial bound of its parts, measured in one run.

python bench/bench_pipeline.py ingest --sink qdrant-edge   # → results/pipeline-ingest-<sink>.json
python bench/bench_pipeline.py ingest --sink qdrant        # qdrant-client :memory:
python bench/bench_pipeline.py all

For each sink: the hash embedder alone on the records' texts; the sink's own client
upserting the same points (the payload vectorsync writes, the same payload indexes, the
same batch size); then ``run --once`` of vectorsync over the same rows. The serial bound
is ``1 / (1/embedder_rate + 1/sink_rate)``: both parts one after the other, nothing else.
CPU is process CPU time (every thread); vectorsync's own CPU per record is the run's
minus what its two parts took alone. ``--profile`` also writes a py-spy profile of the
run (bench/results/pipeline-profile-<sink>.txt, top functions by own time).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_sync import RESULTS, WORK, _fresh, _insert, _write
from vectorsync.config import load_config
from vectorsync.embed.hash import HashEmbedder
from vectorsync.engine import Engine
from vectorsync.model import content_hash, point_id
from vectorsync.render import Renderer
from vectorsync.sinks.qdrant_edge import payload_schema_types

BATCH = 1000  # [sync] batch_size of the run, and of the raw parts
WRITE_CHUNK = 512  # points per sink call (worker._WRITE_CHUNK)


def _rows(n: int) -> list[tuple[Any, ...]]:
    return [
        (i, f"title {i}", f"body of record {i} about topic {i % 97}", f"author-{i % 50}", "a", 2020)
        for i in range(1, n + 1)
    ]


def _points(rows: list[tuple[Any, ...]], renderer: Renderer, model: str) -> list[dict[str, Any]]:
    """What vectorsync writes for each row: id, text and payload with its bookkeeping."""
    out = []
    for r in rows:
        columns = ("id", "title", "body", "author", "tags", "published")
        rendered = renderer.render(dict(zip(columns, r, strict=True)))
        text_hash = content_hash(model, rendered.text)
        payload = {
            **rendered.payload,
            "_vs_key": r[0],
            "_vs_text_hash": text_hash,
            "_vs_version": 1,
            "_vs_schema": "x" * 16,
        }
        out.append({"id": point_id("docs", r[0]), "text": rendered.text, "payload": payload})
    return out


async def _embed_alone(texts: list[str]) -> tuple[float, float, list[list[float]]]:
    embedder = HashEmbedder()
    vectors: list[list[float]] = []
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(0, len(texts), BATCH):
        vectors.extend(await embedder.embed(texts[i : i + BATCH]))
    return time.perf_counter() - wall, time.process_time() - cpu, vectors


def _edge_alone(
    folder: Path, points: list[dict[str, Any]], vectors: list[list[float]], indexes: dict[str, str]
) -> tuple[float, float]:
    import qdrant_edge as qe

    shutil.rmtree(folder, ignore_errors=True)
    config = qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=384, distance=qe.Distance.Cosine))
    shard = qe.EdgeShard.create(str(folder), config)
    types = payload_schema_types()  # the sink's own mapping of index types
    for field, kind in indexes.items():
        shard.update(qe.UpdateOperation.create_field_index(field, types[kind]))
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(0, len(points), WRITE_CHUNK):
        batch = [
            qe.Point(p["id"], v, p["payload"])
            for p, v in zip(points[i : i + WRITE_CHUNK], vectors[i : i + WRITE_CHUNK], strict=True)
        ]
        shard.update(qe.UpdateOperation.upsert_points(batch))
    seconds, cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    shard.flush()
    shard.close()
    return seconds, cpu_s


async def _qdrant_alone(
    points: list[dict[str, Any]], vectors: list[list[float]]
) -> tuple[float, float]:
    from qdrant_client import AsyncQdrantClient, models

    client = AsyncQdrantClient(location=":memory:")
    await client.create_collection(
        "raw", vectors_config=models.VectorParams(size=384, distance=models.Distance.COSINE)
    )
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(0, len(points), WRITE_CHUNK):
        structs = [
            models.PointStruct(id=p["id"], vector=v, payload=p["payload"])
            for p, v in zip(points[i : i + WRITE_CHUNK], vectors[i : i + WRITE_CHUNK], strict=True)
        ]
        await client.upsert("raw", structs, wait=True)
    seconds, cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    await client.close()
    return seconds, cpu_s


def _configure(sink: str, n: int) -> Path:
    folder = _fresh(f"pipeline-{sink}", "hash", batch=BATCH)
    if sink == "qdrant":
        toml = folder / "vectorsync.toml"
        toml.write_text(
            toml.read_text().replace(
                'kind = "qdrant-edge"\npath = ".vectorsync/qdrant"',
                'kind = "qdrant"\npath = ":memory:"',
            )
        )
    _insert(folder, _rows(n))
    return folder


async def bench_ingest(sink: str, n: int, profile: bool) -> None:
    folder = _configure(sink, n)
    config = load_config(folder / "vectorsync.toml")
    rows = _rows(n)
    async with Engine.open(config) as engine:
        await engine.prepare()
        mapping = config.mappings[0]
        indexes = dict(engine.index_types(mapping))
        model = engine.embedders["default"].model_id
        points = _points(rows, Renderer(mapping), model)
        texts = [p["text"] for p in points]
        embed_s, embed_cpu, vectors = await _embed_alone(texts)
        if sink == "qdrant-edge":
            sink_s, sink_cpu = _edge_alone(folder / "raw-edge", points, vectors, indexes)
        else:
            sink_s, sink_cpu = await _qdrant_alone(points, vectors)
        del vectors, points, texts
        cpu = time.process_time()
        spy = _py_spy(sink) if profile else None
        result = await engine.run(once=True)
        run_cpu = time.process_time() - cpu
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            spy.wait()
    assert result.changes == n and result.counts.get("embedded") == n, result.counts
    embed_rate, sink_rate = n / embed_s, n / sink_s
    bound = 1 / (1 / embed_rate + 1 / sink_rate)
    rate = n / result.seconds
    own_cpu_us = (run_cpu - embed_cpu - sink_cpu) / n * 1e6
    _write(
        f"pipeline-ingest-{sink}",
        {
            "records": n,
            "sink": sink if sink == "qdrant-edge" else "qdrant-client :memory:",
            "embedder": "hash",
            "payload_indexes": indexes,
            "embedder_alone_texts_per_s": round(embed_rate, 1),
            "sink_alone_points_per_s": round(sink_rate, 1),
            "serial_bound_per_s": round(bound, 1),
            "run_once_records_per_s": round(rate, 1),
            "ratio_over_serial_bound": round(rate / bound, 3),
            "goal_ratio": 0.8,
            "cpu_us_per_record": {
                "run": round(run_cpu / n * 1e6, 1),
                "embedder_alone": round(embed_cpu / n * 1e6, 1),
                "sink_alone": round(sink_cpu / n * 1e6, 1),
                "vectorsync_own": round(own_cpu_us, 1),
                "goal_vectorsync_own": 40,
            },
        },
    )


def _py_spy(sink: str) -> subprocess.Popen[bytes] | None:
    """py-spy sampling this process while the run lasts, only while a thread holds the GIL
    (the resource every stage shares): its summary lands in results."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy is not installed: no profile", file=sys.stderr)
        return None
    import os

    out = RESULTS / f"pipeline-profile-{sink}.txt"
    raw = WORK / f"pipeline-profile-{sink}.raw"
    proc = subprocess.Popen(
        [spy, "record", "--pid", str(os.getpid()), "--format", "raw", "--gil", "-o", str(raw)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # let it attach before the run starts (a benchmark, not a test)
    _PROFILES.append((raw, out))
    return proc


_PROFILES: list[tuple[Path, Path]] = []


def _summarise(raw: Path, out: Path, top: int = 40) -> None:
    """Own time and total time per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = [f for f in stack.split(";") if not f.startswith("thread ")]
        if not frames:
            continue
        samples += n
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            total[f] = total.get(f, 0) + n
    lines = [f"py-spy samples (all threads) while `run --once` ran: {samples}", "", "own time:"]
    for f, n in sorted(own.items(), key=lambda x: -x[1])[:top]:
        lines.append(f"{100 * n / samples:6.1f}%  {f}")
    lines += ["", "total time (vectorsync functions):"]
    ours = {f: n for f, n in total.items() if "vectorsync" in f}
    for f, n in sorted(ours.items(), key=lambda x: -x[1])[:top]:
        lines.append(f"{100 * n / samples:6.1f}%  {f}")
    out.write_text("\n".join(lines) + "\n")
    print(f"profile: {out}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("which", choices=["ingest", "all"])
    parser.add_argument("--sink", choices=["qdrant-edge", "qdrant"], default="qdrant-edge")
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    sinks = ["qdrant-edge", "qdrant"] if args.which == "all" else [args.sink]
    for sink in sinks:
        asyncio.run(bench_ingest(sink, args.records, args.profile))
    for raw, out in _PROFILES:
        if raw.exists():
            _summarise(raw, out)


if __name__ == "__main__":
    main()
