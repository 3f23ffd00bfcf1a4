"""The openai embedder's throughput through vectorsync ÷ the same server's throughput with
the ``openai`` client called directly, same texts, same run, per concurrency; figures go to
bench/results/openai-embedder.json. The direct client runs twice: texts in source order and
sorted by length (as vectorsync sends them: less padding); the ratio is against the faster.

The server is infinity-emb serving the bundled MiniLM (its venv built once by
scripts/infinity-venv), started here on a free port and stopped at the end.

python bench/bench_openai.py [--texts 600]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from bench_embed import package_descriptions
from bench_sync import WORK, _write

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.embedding_server import MODEL_NAME, infinity  # noqa: E402

from vectorsync.config import load_config  # noqa: E402
from vectorsync.engine import Engine  # noqa: E402

BATCH = 32
CONFIG = """\
[state]
url = "sqlite:///.vectorsync/state.db"
[sources.app]
kind = "sqlite"
path = "app.db"
[sinks.vectors]
kind = "qdrant-edge"
path = ".vectorsync/qdrant"
[embedders.default]
kind = "openai"
url = "{url}"
model = "{model}"
batch_size = {batch}
concurrency = {concurrency}
[[mappings]]
name = "docs"
source = "app"
table = "docs"
key = "id"
text = "{{{{ body }}}}"
sink = "vectors"
"""


def _texts(n: int) -> list[str]:
    """``n`` real texts of mixed length: Debian package descriptions (bench_embed's)."""
    texts = [f"{title}\n{body}" for _, title, body in package_descriptions()]
    if len(texts) < n:
        raise SystemExit(f"only {len(texts)} package descriptions here; ask for fewer")
    return texts[:n]


async def raw(url: str, texts: list[str], concurrency: int) -> float:
    """texts/s of the openai client alone: requests of BATCH texts, ``concurrency`` at once."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    slots = asyncio.Semaphore(concurrency)

    async def one(group: list[str]) -> None:
        async with slots:
            await client.embeddings.create(input=group, model=MODEL_NAME, encoding_format="float")

    groups = [texts[i : i + BATCH] for i in range(0, len(texts), BATCH)]
    started = time.perf_counter()
    await asyncio.gather(*(one(g) for g in groups))
    seconds = time.perf_counter() - started
    await client.close()
    return len(texts) / seconds


async def through_vectorsync(url: str, texts: list[str], concurrency: int) -> float:
    """texts/s of ``run --once`` over the same texts (a fresh project each time)."""
    folder = WORK / f"openai-{concurrency}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    db = sqlite3.connect(folder / "app.db")
    db.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, body TEXT)")
    db.executemany("INSERT INTO docs VALUES (?, ?)", list(enumerate(texts, 1)))
    db.commit()
    db.close()
    (folder / "vectorsync.toml").write_text(
        CONFIG.format(url=url, model=MODEL_NAME, batch=BATCH, concurrency=concurrency)
    )
    async with Engine.open(load_config(folder / "vectorsync.toml")) as engine:
        await engine.prepare()  # the probe request and the capture, outside the timing
        started = time.perf_counter()
        result = await engine.run(once=True)
        seconds = time.perf_counter() - started
    assert result.counts.get("embedded") == len(texts), result.counts
    return len(texts) / seconds


async def bench(n: int) -> None:
    texts = _texts(n)
    figures: dict[str, Any] = {
        "texts": n,
        "server": "infinity-emb 0.0.78, bundled all-MiniLM-L6-v2, CPU, batch 64",
        "request_batch": BATCH,
        "runs": {},
    }
    WORK.mkdir(parents=True, exist_ok=True)
    with infinity(WORK / "infinity.log") as url:
        await raw(url, texts[:64], 1)  # warm-up
        by_length = sorted(texts, key=len)  # what vectorsync sends: less padding per batch
        for concurrency in (1, 2, 4):
            direct = await raw(url, texts, concurrency)
            sorted_direct = await raw(url, by_length, concurrency)
            ours = await through_vectorsync(url, texts, concurrency)
            best_direct = max(direct, sorted_direct)
            figures["runs"][str(concurrency)] = {
                "openai_client_texts_per_s": round(direct, 1),
                "openai_client_sorted_by_length_texts_per_s": round(sorted_direct, 1),
                "vectorsync_run_once_texts_per_s": round(ours, 1),
                "ratio": round(ours / best_direct, 3),
            }
            print(concurrency, figures["runs"][str(concurrency)], flush=True)
    best = max(figures["runs"].values(), key=lambda r: r["vectorsync_run_once_texts_per_s"])
    figures["best"] = best
    figures["goal_ratio"] = 0.9
    _write("openai-embedder", figures)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=600)
    asyncio.run(bench(parser.parse_args().texts))


if __name__ == "__main__":
    main()
