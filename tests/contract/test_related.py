"""One contract for related fields on every SQL-shaped source (in-memory, SQLite,
PostgreSQL, SurrealDB with record links): ``related`` reads a relation forward,
``dependents`` reverses it — including after the related row is gone, when the owner holds
the related key."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from vectorsync.related import Relation
from vectorsync.sources.base import Source, TableSpec
from vectorsync.sources.memory import MemorySource
from vectorsync.sources.postgres import PostgresSource
from vectorsync.sources.sqlite import SqliteSource

DOCS = TableSpec(table="docs", key="id")
CHUNKS = TableSpec(table="chunks", key="id")
# a chunk's document (many-to-one) and a document's chunks (one-to-many)
DOCUMENT = Relation(
    name="document", table="docs", key="id", fields=(("doc_title", "title"),), on=("id", "doc_id")
)
CHUNK_IDS = Relation(
    name="chunks",
    table="chunks",
    key="id",
    fields=(("chunk_ids", "id"),),
    many=True,
    on=("doc_id", "id"),
)

DDL = [
    "CREATE TABLE docs (id INTEGER PRIMARY KEY, title TEXT)",
    "CREATE TABLE chunks (id INTEGER PRIMARY KEY, doc_id INTEGER, body TEXT)",
]
ROWS = [
    ("INSERT INTO docs VALUES (?, ?)", (1, "one")),
    ("INSERT INTO docs VALUES (?, ?)", (2, "two")),
    ("INSERT INTO chunks VALUES (?, ?, ?)", (10, 1, "a")),
    ("INSERT INTO chunks VALUES (?, ?, ?)", (11, 1, "b")),
    ("INSERT INTO chunks VALUES (?, ?, ?)", (20, 2, "c")),
    ("INSERT INTO chunks VALUES (?, ?, ?)", (30, None, "orphan")),
]


@pytest.fixture(params=["memory", "sqlite", "postgres", "surrealdb"])
async def related_source(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Source, Callable[[str, tuple[Any, ...]], None]]]:
    if request.param == "surrealdb":
        from surrealdb import RecordID, Surreal

        from vectorsync.sources.surrealdb import (
            SurrealDBSource,
            delete_statement,
            upsert_statement,
        )

        kb = Surreal("mem://")
        kb.connect()
        kb.use("app", "kb")

        def write_surreal(sql: str, params: tuple[Any, ...]) -> None:
            table = sql.split()[2]
            if sql.startswith("DELETE"):
                kb.query_raw(*delete_statement(table, params[0]))
                return
            if table == "docs":
                row: dict[str, Any] = {"id": params[0], "title": params[1]}
            else:  # a chunk links its document: a record link, not a plain key
                link = None if params[1] is None else RecordID("docs", params[1])
                row = {"id": params[0], "doc_id": link, "body": params[2]}
            kb.query_raw(*upsert_statement(table, row))

        for sql, params in ROWS:
            write_surreal(sql, params)
        surreal = SurrealDBSource("app", namespace="app", database="kb", connection=kb)
        await surreal.open()
        yield surreal, write_surreal
        await surreal.close()
        kb.close()
        return
    if request.param == "memory":
        mem = MemorySource("app")
        mem.create_table("docs", {"id": "INTEGER", "title": "TEXT"})
        mem.create_table("chunks", {"id": "INTEGER", "doc_id": "INTEGER", "body": "TEXT"})

        def write_mem(sql: str, params: tuple[Any, ...]) -> None:
            table = sql.split()[2]
            if sql.startswith("DELETE"):
                mem.delete(table, params[0])
                return
            names = ["id", "title"] if table == "docs" else ["id", "doc_id", "body"]
            mem.upsert(table, dict(zip(names, params, strict=True)))

        for sql, params in ROWS:
            write_mem(sql, params)
        yield mem, write_mem
        return
    if request.param == "sqlite":
        db = sqlite3.connect(tmp_path / "app.db", isolation_level=None)
        for ddl in DDL:
            db.execute(ddl)
        for sql, params in ROWS:
            db.execute(sql, params)
        lite = SqliteSource("app", tmp_path / "app.db")
        await lite.open()
        yield lite, lambda sql, params: db.execute(sql, params) and None
        await lite.close()
        db.close()
        return
    import psycopg

    url = request.getfixturevalue("pg_url")
    conn = psycopg.connect(url, autocommit=True)
    for ddl in DDL:
        conn.execute(ddl.replace("INTEGER", "integer"))  # type: ignore[arg-type]
    for sql, params in ROWS:
        conn.execute(sql.replace("?", "%s"), params)  # type: ignore[arg-type]
    pg = PostgresSource("app", url, capture="outbox")
    await pg.open()
    yield pg, lambda sql, params: conn.execute(sql.replace("?", "%s"), params) and None  # type: ignore[arg-type]
    await pg.close()
    conn.close()


async def test_related_reads_each_owner_its_records(
    related_source: tuple[Source, Callable[[str, tuple[Any, ...]], None]],
) -> None:
    src, _ = related_source
    found = await src.related(CHUNKS, DOCUMENT, [10, 20, 30, 99])
    assert found == {10: [(1, {"doc_title": "one"})], 20: [(2, {"doc_title": "two"})]}
    many = await src.related(DOCS, CHUNK_IDS, [1, 2])
    assert {k: sorted(v, key=lambda r: r[0]) for k, v in many.items()} == {
        1: [(10, {"chunk_ids": 10}), (11, {"chunk_ids": 11})],
        2: [(20, {"chunk_ids": 20})],
    }


async def test_dependents_reverse_the_relation_even_after_a_delete(
    related_source: tuple[Source, Callable[[str, tuple[Any, ...]], None]],
) -> None:
    src, write = related_source
    assert sorted(await src.dependents(CHUNKS, DOCUMENT, [1])) == [10, 11]
    assert sorted(await src.dependents(DOCS, CHUNK_IDS, [11, 20])) == [1, 2]
    write("DELETE FROM docs WHERE id = ?", (1,))
    # the chunks still hold the deleted document's key: they are found without a join
    assert sorted(await src.dependents(CHUNKS, DOCUMENT, [1])) == [10, 11]
    assert await src.related(CHUNKS, DOCUMENT, [10]) == {}
