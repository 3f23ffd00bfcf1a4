"""Related fields on a SQL source (SQLite → qdrant-edge): a chunk carries its document's
title and tags (a join), a document lists its chunks' ids (one-to-many); a change to a
related row re-syncs exactly the records built from it."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import read_sink
from vectorsync.config import load_config
from vectorsync.engine import Engine
from vectorsync.errors import ConfigError
from vectorsync.model import point_id
from vectorsync.sinks.qdrant_edge import QdrantEdgeSink

CONFIG = """
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
name = "chunks"
source = "app"
table = "chunks"
text = "{{ doc_title }}: {{ body }}"
payload = ["doc_id", "doc_title", "doc_tags"]
sink = "vectors"
[[mappings.related]]
name = "document"
table = "documents"
on = { id = "doc_id" }
fields = { doc_title = "title", doc_tags = "tags" }

[[mappings]]
name = "documents"
source = "app"
table = "documents"
text = "{{ title }}"
payload = ["chunk_ids"]
sink = "vectors"
[[mappings.related]]
name = "chunks"
table = "chunks"
on = { doc_id = "id" }
fields = { chunk_ids = "id" }
many = true
"""


@pytest.fixture
def db(workdir: Path) -> sqlite3.Connection:
    return documents_and_chunks(workdir)


def documents_and_chunks(workdir: Path) -> sqlite3.Connection:
    """Three documents of five chunks each, and the project's config."""
    conn = sqlite3.connect(workdir / "app.db", isolation_level=None)
    conn.execute("CREATE TABLE documents (id INTEGER PRIMARY KEY, title TEXT, tags TEXT)")
    conn.execute("CREATE TABLE chunks (id INTEGER PRIMARY KEY, doc_id INTEGER, body TEXT)")
    for d in range(1, 4):
        conn.execute("INSERT INTO documents VALUES (?, ?, ?)", (d, f"doc {d}", "t"))
        for c in range(1, 6):
            conn.execute(
                "INSERT INTO chunks VALUES (?, ?, ?)", (d * 100 + c, d, f"chunk {c} of {d}")
            )
    (workdir / "vectorsync.toml").write_text(CONFIG)
    return conn


async def _sync(workdir: Path) -> dict[str, dict[str, int]]:
    """run --once; per mapping, the counts of what it wrote."""
    totals: dict[str, dict[str, int]] = {}
    async with Engine.open(load_config(workdir / "vectorsync.toml")) as engine:

        def add(report: Any) -> None:
            for name, counts in report.mappings.items():
                mine = totals.setdefault(name, {})
                for k, n in counts.items():
                    mine[k] = mine.get(k, 0) + n

        await engine.run(once=True, on_batch=add)
    return totals


def _writes(counts: dict[str, int]) -> int:
    return counts.get("upserted", 0) + counts.get("payload_only", 0) + counts.get("deleted", 0)


async def _points(workdir: Path, collection: str) -> dict[str, dict[str, Any]]:
    sink = QdrantEdgeSink("read", workdir / ".vectorsync" / "qdrant")
    await sink.open()
    try:
        return {k: r.payload for k, r in (await read_sink(sink, collection)).items()}
    finally:
        await sink.close()


async def test_related_fields_follow_their_records(workdir: Path, db: sqlite3.Connection) -> None:
    await _sync(workdir)
    chunks = await _points(workdir, "chunks")
    assert chunks[point_id("chunks", 201)]["doc_title"] == "doc 2"
    docs = await _points(workdir, "documents")
    assert docs[point_id("documents", 2)]["chunk_ids"] == [201, 202, 203, 204, 205]

    db.execute("UPDATE documents SET title = 'retitled' WHERE id = 2")
    counts = await _sync(workdir)
    # the document itself is re-embedded; exactly its five chunks are re-embedded too
    # (the title is in their text); nothing else is written
    assert _writes(counts["chunks"]) == 5 and counts["chunks"]["embedded"] == 5
    assert _writes(counts["documents"]) == 1
    chunks = await _points(workdir, "chunks")
    assert {chunks[point_id("chunks", 200 + c)]["doc_title"] for c in range(1, 6)} == {"retitled"}
    assert chunks[point_id("chunks", 101)]["doc_title"] == "doc 1"

    db.execute("UPDATE documents SET tags = 'u' WHERE id = 3")  # metadata only
    counts = await _sync(workdir)
    assert counts["chunks"]["payload_only"] == 5 and counts["chunks"]["embedded"] == 0
    assert _writes(counts["documents"]) == 0

    db.execute("UPDATE chunks SET doc_id = 1 WHERE id = 305")  # moved: both documents change
    counts = await _sync(workdir)
    docs = await _points(workdir, "documents")
    assert docs[point_id("documents", 1)]["chunk_ids"] == [101, 102, 103, 104, 105, 305]
    assert docs[point_id("documents", 3)]["chunk_ids"] == [301, 302, 303, 304]
    assert _writes(counts["documents"]) == 2

    db.execute("DELETE FROM documents WHERE id = 1")  # its chunks remain, without a document
    db.execute("DELETE FROM chunks WHERE id = 302")
    counts = await _sync(workdir)
    chunks = await _points(workdir, "chunks")
    assert chunks[point_id("chunks", 305)]["doc_title"] is None
    assert point_id("chunks", 302) not in chunks
    docs = await _points(workdir, "documents")
    assert point_id("documents", 1) not in docs
    assert docs[point_id("documents", 3)]["chunk_ids"] == [301, 303, 304]

    async with Engine.open(load_config(workdir / "vectorsync.toml")) as engine:
        for mapping in ("chunks", "documents"):
            for mode in ("full", "prove"):
                report = await engine.check(mapping, mode=mode)
                assert report.consistent, (mapping, mode, report.counts)


async def test_a_related_change_made_while_stopped_is_found_by_check(
    workdir: Path, db: sqlite3.Connection
) -> None:
    await _sync(workdir)
    db.execute("DROP TRIGGER _vectorsync_documents_upd")  # a change capture cannot see
    db.execute("UPDATE documents SET title = 'sneaky' WHERE id = 3")
    async with Engine.open(load_config(workdir / "vectorsync.toml")) as engine:
        report = await engine.check("chunks", mode="full")
        assert report.counts.get("stale") == 5
        proved = await engine.check("chunks", mode="prove")
        assert {str(k) for k in proved.keys("stale")} == {str(300 + c) for c in range(1, 6)}


@pytest.mark.parametrize(
    ("related", "message"),
    [
        ('table = "documents"\non = { id = "nope" }', "on 'nope' not in table 'chunks'"),
        ('table = "documents"\non = { nope = "doc_id" }', "on 'nope' not in table 'documents'"),
        ('table = "nope"\non = { id = "doc_id" }', "table 'nope' not found"),
        ('pattern = "(d:Document)-[:HAS_CHUNK]->(c)"', "name the mapped nodes with match"),
    ],
)
async def test_bad_relations_name_the_fix(
    workdir: Path, db: sqlite3.Connection, related: str, message: str
) -> None:
    text = CONFIG.replace('table = "documents"\non = { id = "doc_id" }', related, 1)
    (workdir / "vectorsync.toml").write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        async with Engine.open(load_config(workdir / "vectorsync.toml")):
            pass
