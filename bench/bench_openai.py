"""The openai embedder's throughput through vectorsync ÷ the same server's throughput with
the ``openai`` client called directly, same texts, same run, per concurrency; figures go to
bench/results/openai-embedder.json. The direct client runs twice: texts in source order and
sorted by length (as vectorsync sends them: less padding); the ratio is against the faster,
each side at its own best concurrency. Every figure is taken ``--rounds`` times, the rounds
interleaved (min / median / max in the JSON).

The server is infinity-emb serving the bundled MiniLM (its venv built once by
scripts/infinity-venv), started here on a free port and stopped at the end.

python bench/bench_openai.py [--texts 600] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sqlite3
import statistics
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


def _spread(values: list[float]) -> dict[str, Any]:
    return {
        "min": round(min(values), 1),
        "median": round(statistics.median(values), 1),
        "max": round(max(values), 1),
        "each": [round(v, 1) for v in values],
    }


async def bench(n: int, rounds: int) -> None:
    texts = _texts(n)
    by_length = sorted(texts, key=len, reverse=True)  # longest first, as vectorsync sends them
    levels = (1, 2, 4)
    sides = ("openai_client", "openai_client_sorted_by_length", "vectorsync_run_once")
    seen: dict[int, dict[str, list[float]]] = {c: {side: [] for side in sides} for c in levels}
    WORK.mkdir(parents=True, exist_ok=True)
    with infinity(WORK / "infinity.log") as url:
        await raw(url, texts[:64], 1)  # warm-up
        for round_ in range(rounds):  # rounds interleaved: a drift of the machine hits all
            for concurrency in levels:
                figures = seen[concurrency]
                figures["openai_client"].append(await raw(url, texts, concurrency))
                figures["openai_client_sorted_by_length"].append(
                    await raw(url, by_length, concurrency)
                )
                figures["vectorsync_run_once"].append(
                    await through_vectorsync(url, texts, concurrency)
                )
                print(round_, concurrency, {k: round(v[-1], 1) for k, v in figures.items()})

    def direct(c: int, r: int) -> float:
        return max(seen[c]["openai_client"][r], seen[c]["openai_client_sorted_by_length"][r])

    runs: dict[str, Any] = {}
    for c in levels:
        runs[str(c)] = {f"{side}_texts_per_s": _spread(seen[c][side]) for side in sides}
        runs[str(c)]["ratio_median"] = round(
            statistics.median(
                seen[c]["vectorsync_run_once"][r] / direct(c, r) for r in range(rounds)
            ),
            3,
        )
    # each side at its own best concurrency, per round (the pair shares the machine's state)
    per_round = [
        max(seen[c]["vectorsync_run_once"][r] for c in levels) / max(direct(c, r) for c in levels)
        for r in range(rounds)
    ]
    ours = {c: statistics.median(seen[c]["vectorsync_run_once"]) for c in levels}
    theirs = {c: statistics.median(direct(c, r) for r in range(rounds)) for c in levels}
    best_ours, best_theirs = max(ours, key=ours.__getitem__), max(theirs, key=theirs.__getitem__)
    _write(
        "openai-embedder",
        {
            "texts": n,
            "rounds": rounds,
            "server": "infinity-emb 0.0.78, bundled all-MiniLM-L6-v2, CPU, batch 64",
            "request_batch": BATCH,
            "sides": {
                "openai_client": "AsyncOpenAI, requests of request_batch texts in source "
                "order, concurrency at once (a semaphore), encoding_format float",
                "openai_client_sorted_by_length": "the same, texts sorted by length "
                "(longest first) before they are cut into requests",
                "vectorsync_run_once": "engine.run(once=True) over a SQLite table of the same "
                "texts into qdrant-edge (read, hash, embed, write, state); the embedder sorts "
                "the texts the pipeline hands it (a sync batch: up to 1,000 in one call) by "
                "tokens, longest first, cuts requests of request_batch, sends concurrency at "
                "once and puts the vectors back in order",
                "ratio": "vectorsync ÷ the faster of the two direct clients, each side at "
                "its own best concurrency, per round; its min and median over the rounds",
            },
            "runs": runs,
            "best": {
                "vectorsync_concurrency": best_ours,
                "vectorsync_run_once_texts_per_s_median": round(ours[best_ours], 1),
                "openai_client_concurrency": best_theirs,
                "openai_client_best_texts_per_s_median": round(theirs[best_theirs], 1),
                "ratio_of_medians": round(ours[best_ours] / theirs[best_theirs], 3),
                "ratio_per_round": {
                    "min": round(min(per_round), 3),
                    "median": round(statistics.median(per_round), 3),
                    "max": round(max(per_round), 3),
                    "each": [round(x, 3) for x in per_round],
                },
            },
            "goal_ratio": 0.9,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3, help="each figure this many times")
    args = parser.parse_args()
    asyncio.run(bench(args.texts, args.rounds))


if __name__ == "__main__":
    main()
