"""One contract, every source: the in-memory adapter, SQLite, PostgreSQL with logical
replication and with a trigger outbox, FalkorDB (changes written by the graph writer) and
an embedded SurrealDB (change feeds; the application's connection handed over)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.helpers import App, GraphApp, PgApp
from vectorsync.errors import ConfigError
from vectorsync.falkordb_server import FalkorDBServer
from vectorsync.sources.base import Source, TableSpec
from vectorsync.sources.falkordb import FalkorDBSource
from vectorsync.sources.memory import MemorySource
from vectorsync.sources.postgres import PostgresSource
from vectorsync.sources.sqlite import SqliteSource
from vectorsync.sources.surrealdb import SurrealDBSource, delete_statement, upsert_statement

SPEC = TableSpec(table="articles", key="id")
COLUMNS = {
    "id": "INTEGER",
    "title": "TEXT",
    "body": "TEXT",
    "author": "TEXT",
    "tags": "TEXT",
    "published": "INTEGER",
}


class Harness:
    """Writes rows the way an application would, for either source."""

    def __init__(self, source: Source, write: Callable[[str, int, dict[str, object] | None], None]):
        self.source = source
        self._write = write

    def upsert(self, key: int, **values: object) -> None:
        self._write(
            "upsert",
            key,
            {
                "id": key,
                "title": f"t{key}",
                "body": "b",
                "author": "a",
                "tags": "x",
                "published": 1,
                **values,
            },
        )

    def delete(self, key: int) -> None:
        self._write("delete", key, None)


@pytest.fixture(params=["memory", "sqlite", "pg-logical", "pg-outbox", "falkordb", "surrealdb"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    if request.param == "surrealdb":
        from surrealdb import Surreal

        db = Surreal(f"surrealkv://{tmp_path / 'kb'}")  # the application's connection
        db.connect()
        db.use("app", "kb")
        sr_src = SurrealDBSource(
            "app", "surrealkv://", namespace="app", database="kb", connection=db
        )

        def write_surreal(op: str, key: int, row: dict[str, object] | None) -> None:
            statement = delete_statement("articles", key) if row is None else None
            db.query_raw(*(statement or upsert_statement("articles", row or {})))

        await sr_src.open()
        yield Harness(sr_src, write_surreal)
        await sr_src.close()
        db.close()
        return
    if request.param == "falkordb":
        server: FalkorDBServer = request.getfixturevalue("falkordb")
        graph = GraphApp(server.url, request.getfixturevalue("graph_name"))
        fk_src = FalkorDBSource("app", server.url, graph.graph)

        def write_graph(op: str, key: int, row: dict[str, object] | None) -> None:
            if row is None:
                graph.delete(key)
            elif key in graph.rows():
                graph.update(key, **{k: v for k, v in row.items() if k != "id"})
            else:
                graph.writer.create_nodes("articles", [row])

        await fk_src.open()
        yield Harness(fk_src, write_graph)
        await fk_src.close()
        graph.close()
        return
    if request.param.startswith("pg-"):
        url = request.getfixturevalue("pg_url")
        capture = request.param.removeprefix("pg-")
        pg_app = PgApp(url, capture)
        pg_src = PostgresSource("app", url, capture=capture)  # type: ignore[arg-type]

        def write_pg(op: str, key: int, row: dict[str, object] | None) -> None:
            if row is None:
                pg_app.delete(key)
            elif pg_app.execute("SELECT 1 FROM articles WHERE id = ?", (key,)):
                pg_app.update(key, **{k: v for k, v in row.items() if k != "id"})
            else:
                pg_app.insert(key, **{k: v for k, v in row.items() if k != "id"})

        await pg_src.open()
        yield Harness(pg_src, write_pg)
        await pg_src.close()
        pg_app.close()
        return
    if request.param == "memory":
        mem = MemorySource("app", {"articles": COLUMNS})

        def write_mem(op: str, key: int, row: dict[str, object] | None) -> None:
            if row is None:
                mem.delete("articles", key)
            else:
                mem.upsert("articles", row)

        yield Harness(mem, write_mem)
        return
    app = App(tmp_path / "app.db")
    src = SqliteSource("app", tmp_path / "app.db")

    def write_sql(op: str, key: int, row: dict[str, object] | None) -> None:
        if row is None:
            app.delete(key)
        elif app.db.execute("SELECT 1 FROM articles WHERE id = ?", (key,)).fetchone():
            app.update(key, **{k: v for k, v in row.items() if k != "id"})
        else:
            app.insert(key, **{k: v for k, v in row.items() if k != "id"})

    await src.open()
    yield Harness(src, write_sql)
    await src.close()
    app.close()


async def test_columns_and_unknown_table(harness: Harness) -> None:
    harness.upsert(1)  # a graph knows a label's properties from its nodes
    assert set(await harness.source.columns("articles")) == set(COLUMNS)
    with pytest.raises(ConfigError, match=r"(table|label) 'nope' not found"):
        await harness.source.columns("nope")


async def test_existing_rows_are_snapshotted_once_then_changes_stream(harness: Harness) -> None:
    src = harness.source
    harness.upsert(1)
    harness.upsert(2)
    assert await src.setup([SPEC]) == ["articles"]
    assert await src.setup([SPEC]) == []  # idempotent: no second snapshot
    harness.upsert(2, body="new")
    harness.upsert(3)
    harness.delete(1)
    head = await src.head()  # everything committed so far is readable now
    changes = await src.read_changes(0, 100)
    assert [(c.key, c.op) for c in changes] == [
        (1, "snapshot"),
        (2, "snapshot"),
        (2, "update"),
        (3, "insert"),
        (1, "delete"),
    ]
    positions = [c.position for c in changes]
    # one position per transaction (a snapshot page may share one), increasing
    assert positions == sorted(positions) and len(set(positions[1:])) == len(positions) - 1
    assert head == positions[-1]
    assert [c.key for c in await src.read_changes(positions[2], 2)] == [3, 1]


async def test_fetch_rereads_current_rows_and_omits_deleted(harness: Harness) -> None:
    src = harness.source
    await src.setup([SPEC])
    harness.upsert(1, body="v1")
    harness.upsert(1, body="v2")
    harness.upsert(2)
    harness.delete(2)
    await src.head()
    rows = await src.fetch("articles", "id", [1, 2, 99])
    assert list(rows) == [1] and rows[1]["body"] == "v2"


async def test_ack_releases_and_backlog_counts(harness: Harness) -> None:
    src = harness.source
    await src.setup([SPEC])
    for k in range(1, 6):
        harness.upsert(k)
    head = await src.head()
    backlog = await src.backlog(0)
    assert backlog.changes == 5 and backlog.oldest_committed_at is not None
    changes = await src.read_changes(0, 100)
    assert head == changes[-1].position
    await src.ack(changes[2].position)
    assert [c.key for c in await src.read_changes(0, 100)] == [4, 5]
    assert (await src.backlog(changes[2].position)).changes == 2
    assert await src.head() == head


async def test_resnapshot_enqueues_every_live_key(harness: Harness) -> None:
    src = harness.source
    await src.setup([SPEC])
    harness.upsert(1)
    harness.upsert(2)
    head = await src.head()
    await src.resnapshot(SPEC)
    await src.head()
    assert sorted(c.key for c in await src.read_changes(head, 100)) == [1, 2]
