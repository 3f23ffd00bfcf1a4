"""``vectorsync demo --surrealdb``: a knowledge base on an embedded SurrealDB, written
through the write API while the engine streams.

The standard library's documentation goes into an embedded SurrealDB file (a ``document``
per module, a ``chunk`` per class, function and method with a record link to its document,
an ``entity`` per class and ``mentions`` edges to its methods' chunks), synced into
qdrant-edge with the documents' titles and the entities as related fields. Then, in the
same process (an embedded SurrealDB file belongs to one process), the application writes
through ``engine.writer``: a ``strong`` write is found by a search issued right after it
returns; a retitled document re-writes only its chunks' payloads; a deleted chunk goes.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .config import load_config
from .demo_graph import counting, stdlib_graph, written_table
from .engine import Engine

__all__ = ["run_surreal_demo"]

CONFIG = """\
[state]
url = "sqlite:///.vectorsync/state.db"

[sources.kb]
kind = "surrealdb"
url = "{url}"
namespace = "demo"
database = "kb"
poll_interval = 0.1

[sinks.vectors]
kind = "qdrant-edge"
path = ".vectorsync/qdrant"

[embedders.default]
kind = "{embedder}"

[[mappings]]
name = "chunks"
source = "kb"
table = "chunk"
text = "{{{{ id }}}} ({{{{ kind }}}})\\n{{{{ text }}}}"
payload = ["kind", "doc_title", "entities"]
sink = "vectors"
[[mappings.related]]
name = "document"
table = "document"
on = {{ id = "doc" }}
fields = {{ doc_title = "title" }}
[[mappings.related]]
name = "entities"
pattern = "<-mentions<-entity"
fields = {{ entities = "id" }}
many = true

[[mappings]]
name = "documents"
source = "kb"
table = "document"
text = "{{{{ title }}}}"
sink = "vectors"
"""

NOTE = {
    "id": "notes.parse_json",
    "kind": "function",
    "text": "A note written through vectorsync's write API: how to parse a JSON document.",
}


@dataclass(frozen=True, slots=True)
class _Loaded:
    counts: tuple[int, int, int, int]  # documents, chunks, entities, edges
    busiest: str  # the document with the most chunks
    entity: str
    method: str  # a method's chunk


def _load(db: Any, records: int) -> _Loaded:
    from surrealdb import RecordID

    documents, chunks, entities, has_chunk, mentions = stdlib_graph(records)
    doc_of = {h["chunk"]: h["doc"] for h in has_chunk}
    for c in chunks:
        c["doc"] = RecordID("document", doc_of[c["id"]])
    db.query("INSERT INTO document $rows", {"rows": documents})
    db.query("INSERT INTO chunk $rows", {"rows": chunks})
    db.query("INSERT INTO entity $rows", {"rows": entities})
    edges = [
        {"in": RecordID("entity", m["entity"]), "out": RecordID("chunk", m["chunk"])}
        for m in mentions
    ]
    db.query("INSERT RELATION INTO mentions $edges", {"edges": edges})
    return _Loaded(
        counts=(len(documents), len(chunks), len(entities), len(edges)),
        busiest=Counter(doc_of.values()).most_common(1)[0][0],
        entity=entities[0]["id"],
        method=next(c["id"] for c in chunks if c["kind"] == "method"),
    )


async def run_surreal_demo(
    directory: Path, *, records: int, embedder: str, console: Console
) -> None:
    from surrealdb import Surreal

    started = time.monotonic()
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    console.rule("[bold]vectorsync demo --surrealdb")
    url = f"surrealkv://{(directory / 'kb').resolve()}"
    db: Any = Surreal(url)
    db.connect()
    try:
        db.use("demo", "kb")
        loaded = _load(db, records)
        console.print(
            f"1. Wrote the standard library into an embedded SurrealDB ({url}): "
            "{} documents, {} chunks (each linked to its document), {} entities and {} "
            "mentions edges".format(*loaded.counts)
        )
        (directory / "vectorsync.toml").write_text(CONFIG.format(url=url, embedder=embedder))
        config = load_config(directory / "vectorsync.toml")
        async with Engine.open(config, connections={"kb": db}) as engine:
            console.print("2. Loading the model; initial sync from the change feeds …")
            result = await engine.run(once=True)
            console.print(
                f"   {result.changes} changes in {result.seconds:.1f}s: "
                f"{result.counts.get('embedded', 0)} embedded"
            )
            written, on_batch = counting()
            stop = asyncio.Event()
            streaming = asyncio.create_task(engine.run(stop=stop, on_batch=on_batch))
            try:
                await _write(engine, db, loaded, console)
            finally:
                stop.set()
                await streaming
            console.print("   written — only the records built from what changed:")
            console.print(written_table(written))
            proofs = []
            for mapping in ("chunks", "documents"):
                report = await engine.check(mapping, mode="full")
                state = "in sync" if report.consistent else f"DRIFT {report.counts}"
                proofs.append(f"{mapping} {state} ({report.source_records} records)")
            console.print(f"5. check --mode full: {'; '.join(proofs)}")
    finally:
        db.close()
    console.print(f"Done in {time.monotonic() - started:.0f}s (the SurrealDB file is closed).")


async def _write(engine: Engine, db: Any, loaded: _Loaded, console: Console) -> None:
    from surrealdb import RecordID

    async with engine.writer("kb", consistency="strong") as w:
        await w.upsert("chunk", {**NOTE, "doc": RecordID("document", loaded.busiest)})
    hits = await engine.search("chunks", "a note on parsing JSON, written through the API", limit=3)
    table = Table(
        title="3. A strong write, searched right after it returned",
        title_justify="left",
        show_edge=False,
    )
    for col in ("score", "chunk", "document"):
        table.add_column(col, overflow="fold")
    for hit in hits:
        p = hit.record.payload
        table.add_row(f"{hit.score:.3f}", str(p["_vs_key"]), str(p["doc_title"])[:50])
    console.print(table)
    title = f"{loaded.busiest}: retitled through the write API"
    async with engine.writer("kb", consistency="eventual") as w, w.transaction():
        await w.upsert("document", {"id": loaded.busiest, "title": title})
        await w.delete("chunk", loaded.method)
    db.query(
        "RELATE $e->mentions->$c",
        {"e": RecordID("entity", loaded.entity), "c": RecordID("chunk", NOTE["id"])},
    )
    console.print(
        f"4. Through the write API, one transaction: document {loaded.busiest} retitled (its "
        f"chunks' doc_title), chunk {loaded.method} deleted; by the application directly: "
        f"an edge {loaded.entity} -mentions-> {NOTE['id']}"
    )
    await engine.wait_for(await engine.head(), timeout=300)
