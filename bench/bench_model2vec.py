"""A model2vec model distilled from the bundled MiniLM, against MiniLM itself, in one run.

PYTHONPATH=src python bench/bench_model2vec.py                    # distils a model first
PYTHONPATH=src python bench/bench_model2vec.py --model DIR --texts 600

* **speed**: both embedders, as vectorsync builds them from a default config, embed the same
  Debian package descriptions (bench_embed's texts) in batches of their ``batch_size``;
* **content-change ratio**: the same texts inserted into SQLite and synced end to end
  (``run --once`` into qdrant-edge) with each embedder, changes/s ÷ that embedder's raw
  texts/s (bench_sync's ``content`` measure);
* **recall@10**: the demo's records synced with each; for each of the demo's queries, the
  share of MiniLM's top 10 that model2vec's top 10 also holds.

Figures go to bench/results/embed-model2vec.json.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sqlite3
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

from bench_embed import package_descriptions
from bench_sync import WORK, _write
from vectorsync.config import load_config
from vectorsync.demo import CONFIG as DEMO_CONFIG
from vectorsync.demo import DDL, QUERIES, _insert, stdlib_symbols
from vectorsync.embed.base import Embedder
from vectorsync.embed.model2vec import Model2VecEmbedder, distill
from vectorsync.embed.sentence_transformers import (
    SentenceTransformersEmbedder,
    bundled_model_path,
)
from vectorsync.engine import Engine

HERE = WORK / "model2vec"
# the demo's queries, and the search its last lines suggest
DEMO_QUERIES = [*QUERIES, "read a JSON file"]

CONTENT_CONFIG = """\
[state]
url = "sqlite:///.vectorsync/state.db"
[sources.app]
kind = "sqlite"
path = "app.db"
[sinks.vectors]
kind = "qdrant-edge"
path = ".vectorsync/qdrant"
[embedders.default]
kind = "hash"
[[mappings]]
name = "packages"
source = "app"
table = "packages"
key = "id"
text = "{{ title }}\\n{{ body }}"
payload = ["name"]
sink = "vectors"
"""


def _embedder(kind: str, model: Path) -> Embedder:
    if kind == "minilm":
        return SentenceTransformersEmbedder("default")
    return Model2VecEmbedder("default", path=str(model))


async def _raw_rate(embedder: Embedder, texts: list[str], reps: int) -> float:
    """Texts per second of the embedder alone (loaded, warmed up), the median of ``reps``:
    all texts in one call, as the sync hands them over (the embedder batches them itself:
    MiniLM sorts them by length and runs ``concurrency`` model calls at once)."""
    await embedder.embed(texts[:16])
    rates = []
    for _ in range(reps):
        started = time.perf_counter()
        await embedder.embed(texts)
        rates.append(len(texts) / (time.perf_counter() - started))
    return statistics.median(rates)


async def _content(
    kind: str, model: Path, rows: list[tuple[str, str, str]], reps: int
) -> dict[str, Any]:
    folder = HERE / f"content-{kind}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "vectorsync.toml").write_text(CONTENT_CONFIG)
    db = sqlite3.connect(folder / "app.db")
    db.execute("CREATE TABLE packages (id INTEGER PRIMARY KEY, name TEXT, title TEXT, body TEXT)")
    db.commit()
    texts = [f"{title}\n{body}" for _, title, body in rows]  # what the template renders
    embedder = _embedder(kind, model)
    config = load_config(folder / "vectorsync.toml")
    async with Engine.open(config, embedders={"default": embedder}) as engine:
        await engine.prepare()
        raw = await _raw_rate(embedder, texts, reps)
        db.executemany("INSERT INTO packages (name, title, body) VALUES (?, ?, ?)", rows)
        db.commit()
        truncated_before = getattr(embedder, "texts_truncated", 0)
        result = await engine.run(once=True)
        truncated = getattr(embedder, "texts_truncated", 0) - truncated_before
    db.close()
    assert result.counts.get("embedded") == len(rows), result.counts
    end_to_end = result.changes / result.seconds
    return {
        "model_id": embedder.model_id,
        "dimension": embedder.dimension,
        "raw_texts_per_s": round(raw, 1),
        "end_to_end_changes_per_s": round(end_to_end, 1),
        "content_change_ratio": round(end_to_end / raw, 3),
        "texts_cut_to_the_window": truncated,
    }


async def _demo_top10(kind: str, model: Path, records: int) -> dict[str, Any]:
    folder = HERE / f"demo-{kind}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with warnings.catch_warnings():  # reading typing.io's docstring warns (Python 3.11)
        warnings.simplefilter("ignore", DeprecationWarning)
        rows = list(stdlib_symbols(records))
    db = sqlite3.connect(folder / "app.db")
    db.execute(DDL)
    _insert(db, rows)
    db.commit()
    db.close()
    (folder / "vectorsync.toml").write_text(DEMO_CONFIG.format(embedder="hash"))
    config = load_config(folder / "vectorsync.toml")
    embedder = _embedder(kind, model)
    async with Engine.open(config, embedders={"default": embedder}) as engine:
        result = await engine.run(once=True)
        top = {
            q: [
                str(h.record.payload["_vs_key"]) for h in await engine.search("stdlib", q, limit=10)
            ]
            for q in DEMO_QUERIES
        }
    return {"records": len(rows), "sync_seconds": round(result.seconds, 1), "top10": top}


async def main(args: argparse.Namespace) -> None:
    model = args.model
    distill_s = None
    if model is None:
        model = HERE / "minilm-m2v"
        started = time.perf_counter()
        distill(bundled_model_path(), model, force=True, say=print)
        distill_s = round(time.perf_counter() - started, 1)
    rows = package_descriptions()[: args.texts]
    content = {k: await _content(k, model, rows, args.reps) for k in ("model2vec", "minilm")}
    demo = {k: await _demo_top10(k, model, args.records) for k in ("model2vec", "minilm")}
    per_query = {
        q: len(set(demo["model2vec"]["top10"][q]) & set(demo["minilm"]["top10"][q])) / 10
        for q in DEMO_QUERIES
    }
    m2v, minilm = content["model2vec"], content["minilm"]
    _write(
        "embed-model2vec",
        {
            "texts": len(rows),
            "text_source": "Debian package descriptions (/var/lib/dpkg/status), by package name",
            "repetitions": args.reps,
            "model2vec_model": str(model),
            "distill_seconds": distill_s,
            "model2vec_texts_per_s": m2v["raw_texts_per_s"],
            "minilm_texts_per_s": minilm["raw_texts_per_s"],
            "speedup": round(m2v["raw_texts_per_s"] / minilm["raw_texts_per_s"], 1),
            "content_change_ratio_model2vec": m2v["content_change_ratio"],
            "content_change_ratio_minilm": minilm["content_change_ratio"],
            "end_to_end_changes_per_s_model2vec": m2v["end_to_end_changes_per_s"],
            "end_to_end_changes_per_s_minilm": minilm["end_to_end_changes_per_s"],
            "recall_at_10_mean": round(statistics.mean(per_query.values()), 3),
            "recall_at_10_means": "for each of the demo's queries, the share of MiniLM's top "
            "10 (the demo's records, synced with each model) that model2vec's top 10 holds",
            "recall_at_10_per_query": per_query,
            "content": content,
            "demo": demo,
        },
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=None, help="a model2vec folder")
    parser.add_argument("--texts", type=int, default=600)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--records", type=int, default=3000, help="the demo's default")
    asyncio.run(main(parser.parse_args()))
