"""Hybrid search (dense + sparse, fused by reciprocal rank) against dense-only, on the demo.

PYTHONPATH=src python bench/bench_hybrid.py [--records 3000]

The demo's records (standard-library symbols with their docstrings) are synced once into
qdrant-edge with two named vectors: ``dense`` (the bundled MiniLM, the demo's template) and
``terms`` (``kind = "sparse"`` over MiniLM's tokenizer, IDF by the sink). Each of the demo's
queries is then searched three ways — dense only, terms only, hybrid — and scored against a
judgment written here: the symbols that answer it (e.g. ``json.loads`` for "parse a JSON
document into Python objects"). Reported per query and on average: reciprocal rank of the
first answer within the top 10 (MRR@10) and how many answers the top 10 holds.

Figures go to bench/results/hybrid-search.json.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sqlite3
import statistics
import warnings
from typing import Any

from bench_sync import WORK, _write
from vectorsync.config import load_config
from vectorsync.demo import CONFIG as DEMO_CONFIG
from vectorsync.demo import DDL, QUERIES, _insert, stdlib_symbols
from vectorsync.engine import Engine

HERE = WORK / "hybrid"

# query → (module prefixes, symbol names) of the symbols that answer it
JUDGMENTS: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    QUERIES[0]: (("json",), frozenset({"json", "loads", "load", "JSONDecoder", "decode"})),
    QUERIES[1]: (
        ("subprocess", "os"),
        frozenset({"run", "check_output", "getoutput", "getstatusoutput", "communicate", "popen"}),
    ),
    QUERIES[2]: (("gzip", "zlib"), frozenset({"gzip", "compress", "open", "GzipFile", "write"})),
    QUERIES[3]: (
        ("asyncio",),
        frozenset({"gather", "wait", "TaskGroup", "as_completed", "wait_for"}),
    ),
    "read a JSON file": (("json",), frozenset({"load", "loads", "JSONDecoder"})),
}

VECTORS = """
[embedders.terms]
kind = "sparse"

[[mappings.vectors]]
name = "dense"
embedder = "default"
text = "{{ id }}{{ signature or '' }} ({{ kind }})\\n{{ (doc or '')[:600] }}"

[[mappings.vectors]]
name = "terms"
embedder = "terms"
text = "{{ id }} {{ name }} {{ (doc or '')[:600] }}"
"""


def _relevant(query: str, key: str) -> bool:
    modules, names = JUDGMENTS[query]
    module_ok = any(key == m or key.startswith(m + ".") for m in modules)
    return module_ok and key.rsplit(".", 1)[-1] in names


def _score(query: str, keys: list[str]) -> dict[str, Any]:
    ranks = [i for i, k in enumerate(keys, 1) if _relevant(query, k)]
    return {
        "reciprocal_rank": round(1 / ranks[0], 3) if ranks else 0.0,
        "answers_in_top10": len(ranks),
        "top3": keys[:3],
    }


async def main(args: argparse.Namespace) -> None:
    shutil.rmtree(HERE, ignore_errors=True)
    HERE.mkdir(parents=True)
    with warnings.catch_warnings():  # reading typing.io's docstring warns (Python 3.11)
        warnings.simplefilter("ignore", DeprecationWarning)
        rows = list(stdlib_symbols(args.records))
    db = sqlite3.connect(HERE / "app.db")
    db.execute(DDL)
    _insert(db, rows)
    db.commit()
    db.close()
    base = DEMO_CONFIG.format(embedder="sentence-transformers")
    head, mapping = base.split("[[mappings]]")
    mapping_lines = [
        line for line in mapping.splitlines() if not line.startswith(("text = ", "embedder = "))
    ]
    sparse, vectors = VECTORS.split("[[mappings.vectors]]", 1)
    toml = head + sparse + "[[mappings]]" + "\n".join(mapping_lines) + "\n[[mappings.vectors]]"
    (HERE / "vectorsync.toml").write_text(toml + vectors)
    config = load_config(HERE / "vectorsync.toml")
    per_query: dict[str, dict[str, Any]] = {}
    async with Engine.open(config) as engine:
        result = await engine.run(once=True)
        for query in JUDGMENTS:
            ways = {
                "dense": await engine.search("stdlib", query, 10),
                "terms": await engine.search("stdlib", query, 10, vector="terms"),
                "hybrid": await engine.search("stdlib", query, 10, hybrid=True),
            }
            per_query[query] = {
                way: _score(query, [str(h.record.payload["_vs_key"]) for h in hits])
                for way, hits in ways.items()
            }
    means = {
        way: {
            "mrr_at_10": round(
                statistics.mean(q[way]["reciprocal_rank"] for q in per_query.values()), 3
            ),
            "answers_in_top10": round(
                statistics.mean(q[way]["answers_in_top10"] for q in per_query.values()), 2
            ),
        }
        for way in ("dense", "terms", "hybrid")
    }
    _write(
        "hybrid-search",
        {
            "records": len(rows),
            "sync_seconds": round(result.seconds, 1),
            "dense": "bundled all-MiniLM-L6-v2 (the demo's template)",
            "sparse": 'kind = "sparse" over MiniLM\'s tokenizer, Qdrant idf modifier',
            "fusion": "reciprocal rank (qdrant-edge Fusion.Rrf k=60), 40 candidates each side",
            "judgments": {q: sorted(n) for q, (_, n) in JUDGMENTS.items()},
            "means": means,
            "per_query": per_query,
        },
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=3000, help="the demo's default")
    asyncio.run(main(parser.parse_args()))
