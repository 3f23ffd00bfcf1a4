"""Names vectorsync derives on PostgreSQL (trigger functions, triggers, slots, publications,
outbox tables, channels) stay unique and within the 63-byte identifier limit whatever the
table and source names are: every change of every mapped table is captured, in both
capture modes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.conftest import drop_database
from tests.helpers import read_sink, sync_once
from tests.pgserver import PgServer
from vectorsync.errors import ConfigError
from vectorsync.sinks.qdrant_edge import QdrantEdgeSink
from vectorsync.sources.base import TableSpec
from vectorsync.sources.postgres import PostgresSource, capture_name, derived_name


def _exactly(size: int, text: str) -> str:
    """``text`` repeated and cut to exactly ``size`` UTF-8 bytes (padded with 'x')."""
    out = ""
    for ch in text * size:
        if len((out + ch).encode()) > size:
            break
        out += ch
    return out + "x" * (size - len(out.encode()))


UNICODE_63 = _exactly(63, "Ünïcødé 表格 ")
TABLE_CASES = {
    "1-byte": ["t"],
    "46-bytes": ["a" * 46],
    "47-bytes": ["b" * 47],
    "63-bytes": ["c" * 63],
    "double-quote": ['say "hi"', '"' + "q" * 61 + '"'],
    "spaces": ["with spaces in it"],
    "dollar-quote": ["x$f$y $$ z"],
    "unicode-63-bytes": [UNICODE_63],
    "shared-62-byte-prefix": ["p" * 62 + "1", "p" * 62 + "2"],
}
MODES = ["outbox", "logical"]


def test_derived_names_are_bounded_distinct_and_keep_short_names() -> None:
    tables = [t for case in TABLE_CASES.values() for t in case] + ["p" * 62, "p" * 61 + "_1"]
    functions = [
        derived_name("vectorsync_app", "public", t, part, verbatim=False)
        for t in tables
        for part in ("row", "stmt")
    ]
    assert len(set(functions)) == len(functions)
    assert all(len(f.encode()) <= 63 for f in functions)
    assert derived_name("ü" * 40).startswith("ü" * 22) and len(derived_name("ü" * 40)) == 40
    # names existing installs use stay as they were
    assert capture_name("app") == "vectorsync_app"
    assert derived_name("vectorsync_app", "outbox") == "vectorsync_app_outbox"
    # ambiguous joins are not taken verbatim: ("a", "b_x") and ("a_b", "x")
    assert derived_name("a", "b_x", verbatim=False) != derived_name("a_b", "x", verbatim=False)
    # a verbatim name never looks like a hashed one
    hashed_looking = "vectorsync_" + "app" + "__0123456789abcdef"
    assert capture_name("app__0123456789abcdef") != hashed_looking
    slots = [capture_name(n) for n in ("App-1", "app_1", "app-1", "x" * 80, "x" * 81, "表")]
    assert len(set(slots)) == len(slots)
    assert all(re.fullmatch(r"[a-z0-9_]{1,63}", slot) for slot in slots)


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db(pg_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        yield conn


def _create(db: psycopg.Connection[Any], table: str) -> None:
    db.execute(
        sql.SQL("CREATE TABLE {} (id integer PRIMARY KEY, body text)").format(sql.Identifier(table))
    )


def _write(db: psycopg.Connection[Any], table: str, statement: str, *args: Any) -> None:
    db.execute(sql.SQL(statement).format(t=sql.Identifier(table)), args)


def _toml(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string


def _config(folder: Path, url: str, mode: str, mappings: Sequence[tuple[str, str]]) -> Path:
    """A project mapping each (source name, table) to its own collection m0, m1, ..."""
    lines = ['[state]\nurl = "sqlite:///.vectorsync/state.db"']
    for source in dict.fromkeys(s for s, _ in mappings):
        lines.append(
            f'[sources.{_toml(source)}]\nkind = "postgres"\nurl = "{url}"\n'
            f'capture = "{mode}"\npoll_interval = 0.2'
        )
    lines.append('[sinks.vectors]\nkind = "qdrant-edge"\npath = ".vectorsync/qdrant"')
    lines.append('[embedders.default]\nkind = "hash"')
    for i, (source, table) in enumerate(mappings):
        lines.append(
            f'[[mappings]]\nname = "m{i}"\nsource = {_toml(source)}\ntable = {_toml(table)}\n'
            'key = "id"\ntext = "{{ body }}"\npayload = ["body"]\nsink = "vectors"'
        )
    path = folder / "vectorsync.toml"
    path.write_text("\n\n".join(lines) + "\n")
    return path


async def _sink_contents(folder: Path, collections: int) -> dict[str, dict[int, str]]:
    """Per collection m<i>: key -> body of every point (vectorsync stopped)."""
    sink = QdrantEdgeSink("check", folder / ".vectorsync" / "qdrant")
    await sink.open()
    try:
        found: dict[str, dict[int, str]] = {}
        for i in range(collections):
            points = await read_sink(sink, f"m{i}")
            found[f"m{i}"] = {p.payload["_vs_key"]: p.payload["body"] for p in points.values()}
        return found
    finally:
        await sink.close()


async def _sync_and_check(
    db: psycopg.Connection[Any], folder: Path, url: str, mode: str, mapped: list[tuple[str, str]]
) -> None:
    """Snapshot, then an insert, an update and a delete in every table: after each
    ``run --once`` the sink holds exactly the rows of every table."""
    tables = [t for _, t in mapped]
    for t in tables:
        _create(db, t)
        _write(db, t, "INSERT INTO {t} VALUES (1, %s), (2, %s)", f"one {t}", f"two {t}")
    cfg = _config(folder, url, mode, mapped)
    await sync_once(cfg)
    want = {f"m{i}": {1: f"one {t}", 2: f"two {t}"} for i, t in enumerate(tables)}
    assert await _sink_contents(folder, len(tables)) == want
    for t in tables:
        _write(db, t, "INSERT INTO {t} VALUES (3, %s)", f"three {t}")
        _write(db, t, "UPDATE {t} SET body = %s WHERE id = 1", f"one again {t}")
        _write(db, t, "DELETE FROM {t} WHERE id = 2")
    counts = await sync_once(cfg)
    assert counts["changes"] >= 3 * len(tables), counts
    want = {f"m{i}": {1: f"one again {t}", 3: f"three {t}"} for i, t in enumerate(tables)}
    assert await _sink_contents(folder, len(tables)) == want


@pytest.mark.parametrize("tables", TABLE_CASES.values(), ids=TABLE_CASES.keys())
async def test_every_change_of_any_table_name_is_captured(
    workdir: Path, pg_url: str, db: psycopg.Connection[Any], mode: str, tables: list[str]
) -> None:
    assert all(len(t.encode()) <= 63 for t in tables)
    await _sync_and_check(db, workdir, pg_url, mode, [("app", t) for t in tables])


async def test_a_long_source_name_gets_a_bounded_capture(
    workdir: Path, pg_url: str, db: psycopg.Connection[Any], mode: str
) -> None:
    source = "a-rather-long-source-name-" + "x" * 54
    await _sync_and_check(db, workdir, pg_url, mode, [(source, "docs")])
    assert len(source) == 80 and len(capture_name(source).encode()) <= 63


async def test_source_names_that_sanitize_alike_get_their_own_capture(
    workdir: Path, pg_url: str, db: psycopg.Connection[Any], mode: str
) -> None:
    await _sync_and_check(db, workdir, pg_url, mode, [("App-1", "left"), ("app_1", "right")])
    assert capture_name("App-1") != capture_name("app_1")
    if mode == "logical":
        probe = "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()"
    else:
        probe = (
            "SELECT count(*) FROM pg_tables "
            "WHERE schemaname = 'vectorsync' AND tablename LIKE '%outbox%'"
        )
    assert db.execute(probe).fetchone() == (2,)


async def test_teardown_leaves_another_capture_alone(
    pg_url: str, db: psycopg.Connection[Any]
) -> None:
    """Capture names where one is a prefix of the other ("vectorsync_a", "vectorsync_a_b"):
    tearing one down keeps the other's triggers and functions working."""
    for t in ("b_x", "x"):
        _create(db, t)
    a, ab = (
        PostgresSource("a", pg_url, capture="outbox"),
        PostgresSource("a_b", pg_url, capture="outbox"),
    )
    for source in (a, ab):
        await source.open()
    try:
        await a.setup([TableSpec(table="b_x", key="id")])
        await ab.setup([TableSpec(table="x", key="id")])
        await a.teardown()
        _write(db, "x", "INSERT INTO {t} VALUES (1, 'kept')")
        _write(db, "b_x", "INSERT INTO {t} VALUES (1, 'not captured')")
        assert [(c.table, c.key, c.op) for c in await ab.read_changes(0, 10)] == [
            ("x", 1, "insert")
        ]
        await ab.teardown()
        left = db.execute(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = 'vectorsync'"
        ).fetchone()
        assert left == (0,)
    finally:
        for source in (a, ab):
            await source.close()


async def test_functions_of_an_older_install_are_replaced_and_torn_down(
    pg_url: str, db: psycopg.Connection[Any]
) -> None:
    """An install made with the old function names (``<capture>_<table>_row``) is
    reinstalled by setup, which drops the function it replaced; teardown also drops an
    old function left behind by a table dropped since."""
    _create(db, "articles")
    source = PostgresSource("app", pg_url, capture="outbox")
    await source.open()
    try:
        await source.setup([TableSpec(table="articles", key="id")])
        old_body = (
            'BEGIN INSERT INTO "vectorsync"."vectorsync_app_outbox" (tbl, key, op) '
            "VALUES ('articles', NEW.id::text, 'insert'); RETURN NULL; END"
        )
        for fn in ("vectorsync_app_articles_row", "vectorsync_app_gone_row"):
            db.execute(
                sql.SQL("CREATE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS {}").format(
                    sql.Identifier("vectorsync", fn), sql.Literal(old_body)
                )
            )
        db.execute("DROP TRIGGER vectorsync_app_row ON articles")
        db.execute(
            "CREATE TRIGGER vectorsync_app_row AFTER INSERT ON articles FOR EACH ROW "
            "EXECUTE FUNCTION vectorsync.vectorsync_app_articles_row()"
        )
        functions = (
            "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = 'vectorsync' ORDER BY 1"
        )
        await source.setup([TableSpec(table="articles", key="id")])
        names = [r[0] for r in db.execute(functions).fetchall()]
        assert "vectorsync_app_articles_row" not in names and "vectorsync_app_gone_row" in names
        assert len(names) == 3  # the gone table's, and the current row and statement ones
        _write(db, "articles", "INSERT INTO {t} VALUES (7, 'seven')")
        changes = await source.read_changes(0, 10)
        assert [(c.table, c.key, c.op) for c in changes] == [("articles", 7, "insert")]
        await source.teardown()
        assert db.execute(functions).fetchall() == []
    finally:
        await source.close()


async def test_an_older_install_under_the_sanitized_source_name_is_kept(
    pg_url: str, db: psycopg.Connection[Any], mode: str
) -> None:
    """Before names were distinct, source "my-db" used capture vectorsync_my_db: that
    install (its slot, its outbox) is kept rather than left pinning WAL or filling an
    outbox, and source "my_db", whose name it also is, may not share it."""
    _create(db, "docs")
    specs = [TableSpec(table="docs", key="id")]
    older = PostgresSource("my-db", pg_url, capture=mode, slot="vectorsync_my_db")  # type: ignore[arg-type]
    await older.open()
    await older.setup(specs)
    await older.close()
    db.execute("DELETE FROM vectorsync.captures")  # an older vectorsync recorded no epoch
    source = PostgresSource("my-db", pg_url, capture=mode)  # type: ignore[arg-type]
    await source.open()
    try:
        assert source.slot == "vectorsync_my_db"
        assert await source.setup(specs) == []  # the install is kept: no new snapshot
        assert await source.epoch() != ""
        other = PostgresSource("my_db", pg_url, capture=mode)  # type: ignore[arg-type]
        await other.open()
        try:
            with pytest.raises(ConfigError, match="belongs to source 'my-db'"):
                await other.setup(specs)
        finally:
            await other.close()
        await source.teardown()
    finally:
        await source.close()
    fresh = PostgresSource("my-db", pg_url, capture=mode)  # type: ignore[arg-type]
    await fresh.open()
    try:
        assert fresh.slot == capture_name("my-db") != "vectorsync_my_db"
    finally:
        await fresh.close()


async def test_a_slot_of_another_database_is_refused(pg: PgServer, pg_url: str) -> None:
    """Slot names are per server: the same source name on two databases of one server
    cannot share a slot."""
    other_url = pg.create_database("other_db_of_the_server")
    try:
        for url in (other_url, pg_url):
            with psycopg.connect(url, autocommit=True) as conn:
                _create(conn, "docs")
        first = PostgresSource("app", other_url, capture="logical")
        second = PostgresSource("app", pg_url, capture="logical")
        try:
            await first.open()
            await first.setup([TableSpec(table="docs", key="id")])
            await second.open()
            with pytest.raises(ConfigError, match="belongs to database 'other_db_of_the_server'"):
                await second.setup([TableSpec(table="docs", key="id")])
        finally:
            await first.close()
            await second.close()
    finally:
        drop_database(pg, "other_db_of_the_server")
