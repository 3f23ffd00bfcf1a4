"""PostgreSQL specifics, in both capture modes, against a real PostgreSQL 15 cluster:
TOAST, metadata-only and primary-key updates, TRUNCATE, a server crash mid-stream, the
resumable snapshot, refused tables, teardown, secrets, and PostgreSQL as the state store."""

from __future__ import annotations

import asyncio
import random
import string
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.e2e.test_cli import cli
from tests.helpers import PgApp, check, load, sync_once, write_config
from tests.pgserver import PASSWORD, PgServer
from vectorsync.embed.hash import HashEmbedder
from vectorsync.engine import Engine
from vectorsync.errors import PermanentError, VectorsyncError
from vectorsync.sources import postgres as pg_source
from vectorsync.sources.base import TableSpec
from vectorsync.sources.pg_logical import LogicalCapture
from vectorsync.sources.pg_outbox import OutboxCapture
from vectorsync.sources.pgoutput import Decoder, Transaction
from vectorsync.state.schema import SCHEMA_VERSION


@pytest.fixture(params=["logical", "outbox"])
def pgapp(request: pytest.FixtureRequest, workdir: Path, pg_url: str) -> Iterator[PgApp]:
    application = PgApp(pg_url, request.param)
    (workdir / "source.toml").write_text(application.source_toml)
    try:
        yield application
    finally:
        application.close()


def _noise(n: int, seed: int) -> str:
    """Incompressible text: stored out of line (TOAST), not inline compressed."""
    return "".join(random.Random(seed).choices(string.ascii_letters + " ", k=n))


def test_decoder_reads_real_pgoutput(pg_url: str) -> None:
    """The decoder against bytes the server produced: a TOAST-unchanged update, a key
    change, a delete, a TRUNCATE and a vectorsync logical message."""
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("CREATE TABLE docs (id integer PRIMARY KEY, body text, meta text)")
        db.execute("CREATE PUBLICATION p FOR TABLE docs")
        db.execute("SELECT pg_create_logical_replication_slot('s', 'pgoutput')")
        db.execute("INSERT INTO docs VALUES (1, %s, 'a')", (_noise(200_000, 1),))
        db.execute("UPDATE docs SET meta = 'b' WHERE id = 1")  # body travels as 'u'
        db.execute("UPDATE docs SET id = 2 WHERE id = 1")
        db.execute("DELETE FROM docs WHERE id = 2")
        db.execute("TRUNCATE docs")
        db.execute(
            "SELECT pg_logical_emit_message(true, 'vectorsync', %s::bytea)",
            (b'{"slot": "s", "table": "docs", "op": "snapshot", "keys": [7, 8]}',),
        )
        db.execute("SELECT pg_logical_emit_message(false, 'vectorsync-heartbeat', 's')")
        db.execute("SELECT pg_logical_emit_message(true, 'vectorsync-fence', 's')")
        raw = db.execute(
            "SELECT data FROM pg_logical_slot_get_binary_changes('s', NULL, NULL, "
            "'proto_version', '1', 'publication_names', 'p', 'messages', 'true')"
        ).fetchall()
        db.execute("SELECT pg_drop_replication_slot('s')")
    txns: list[Transaction] = []
    markers: list[int] = []
    decoder = Decoder({"docs": "id"}, "s", txns.append, lambda lsn, _: markers.append(lsn))
    for (data,) in raw:
        decoder.feed(bytes(data))
    got = [[(c.table, c.key, c.op) for c in t.changes] for t in txns[:-1]]
    assert got == [
        [("docs", 1, "insert")],
        [("docs", 1, "update")],
        [("docs", 1, "delete"), ("docs", 2, "update")],
        [("docs", 2, "delete")],
        [("docs", "", "truncate")],
        [("docs", 7, "snapshot"), ("docs", 8, "snapshot")],
    ]
    positions = [t.position for t in txns]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    assert not txns[-1].changes  # the fence: a transaction of its own, with no changes
    assert len(markers) == 1 and positions[-2] < markers[0] < positions[-1]
    assert all(t.committed_at > time.time() - 600 for t in txns)


async def test_toast_metadata_and_primary_key_updates(workdir: Path, pgapp: PgApp) -> None:
    pgapp.insert(1, body=_noise(300_000, 1))
    pgapp.insert(2)
    cfg = write_config(workdir, extra_mapping="max_text_length = 1000000")
    embedder = HashEmbedder("default")
    await sync_once(cfg, embedder)
    assert embedder.texts_embedded == 2

    pgapp.update(1, author="zed")  # only metadata: the TOASTed body is not in the change
    counts = await sync_once(cfg, embedder)
    assert counts["payload_only"] == 1 and embedder.texts_embedded == 2
    await check(cfg, pgapp)

    pgapp.update(1, body=_noise(300_000, 2))  # only the large column
    counts = await sync_once(cfg, embedder)
    assert counts["upserted"] == 1 and embedder.texts_embedded == 3
    await check(cfg, pgapp)

    pgapp.execute("UPDATE articles SET id = 100 WHERE id = 1")  # the primary key
    counts = await sync_once(cfg, embedder)
    assert counts["deleted"] == 1 and counts["upserted"] == 1
    await check(cfg, pgapp)


async def test_truncate_removes_the_mapping_points(workdir: Path, pgapp: PgApp) -> None:
    for k in range(1, 6):
        pgapp.insert(k)
    cfg = write_config(workdir)
    await sync_once(cfg)
    with pgapp.transaction():
        pgapp.execute("TRUNCATE articles")
        pgapp.insert(3, body="back after the truncate")
    counts = await sync_once(cfg)
    assert counts["deleted"] == 4
    await check(cfg, pgapp)
    assert set(pgapp.rows()) == {3}


async def _converge_while_streaming(engine: Engine, deadline: float) -> None:
    """Wait (bounded) until everything committed so far is applied; the source may be
    restarting, so reading its head is retried until the deadline."""
    end = time.monotonic() + deadline
    while True:
        try:
            await engine.wait_for(await engine.head(), timeout=max(1.0, end - time.monotonic()))
            return
        except VectorsyncError:
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.2)


async def test_server_crash_during_streaming_loses_nothing(
    workdir: Path, pgapp: PgApp, pg: PgServer
) -> None:
    rng = random.Random(5)
    pgapp.random_ops(rng, 100)
    cfg = write_config(workdir, batch_size=20)
    async with Engine.open(load(cfg)) as engine:
        await engine.prepare()
        stop = asyncio.Event()
        streaming = asyncio.create_task(engine.run(stop=stop))
        pgapp.random_ops(rng, 150)
        pg.restart_immediate()  # pg_ctl restart -m immediate: the server crashes
        pg.wait_ready()
        pgapp.close()
        writer = pgapp.clone()
        writer.random_ops(rng, 150)
        await _converge_while_streaming(engine, 120)
        stop.set()
        await streaming
    try:
        await check(cfg, writer)
    finally:
        writer.close()


async def test_snapshot_resumes_after_the_last_committed_page(
    workdir: Path, pgapp: PgApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k in range(1, 96):
        pgapp.insert(k)
    monkeypatch.setattr(pg_source, "SNAPSHOT_PAGE", 10)
    capture = LogicalCapture if pgapp.capture == "logical" else OutboxCapture
    original = capture.write_keys
    pages: list[int] = []

    async def crash_on_fourth_page(self: object, conn: object, table: str, keys, op: str) -> None:  # type: ignore[no-untyped-def]
        pages.append(len(keys))
        if len(pages) == 4:
            raise RuntimeError("crash in the middle of the snapshot")
        await original(self, conn, table, keys, op)  # type: ignore[arg-type]

    monkeypatch.setattr(capture, "write_keys", crash_on_fourth_page)
    cfg = write_config(workdir)
    with pytest.raises(RuntimeError, match="middle of the snapshot"):
        async with Engine.open(load(cfg)) as engine:
            await engine.prepare()
    monkeypatch.setattr(capture, "write_keys", original)
    counts = await sync_once(cfg)
    # three pages were committed before the crash; the rest follow them, nothing twice
    assert counts["changes"] == 95 and counts["upserted"] == 95
    await check(cfg, pgapp)


def _cli(
    workdir: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return cli(*args, cwd=workdir, env=env)


def test_tables_without_a_usable_key_are_refused(workdir: Path, pgapp: PgApp) -> None:
    pgapp.execute("CREATE TABLE loose (LIKE articles)")  # the columns, not the primary key
    cfg = write_config(workdir)
    cfg.write_text(cfg.read_text().replace('table = "articles"', 'table = "loose"'))
    done = _cli(workdir, "setup")
    assert done.returncode == 2, done.stderr
    message = " ".join(done.stderr.split())
    assert "no primary key" in message and "ADD PRIMARY KEY (id)" in message
    if pgapp.capture == "logical":
        pgapp.execute("ALTER TABLE articles REPLICA IDENTITY NOTHING")
        cfg = write_config(workdir)
        done = _cli(workdir, "setup")
        assert done.returncode == 2, done.stderr
        message = " ".join(done.stderr.split())
        assert "REPLICA IDENTITY" in message and "capture = 'outbox'" in message
        pgapp.execute("ALTER TABLE articles REPLICA IDENTITY FULL")
        assert _cli(workdir, "setup").returncode == 0


def test_teardown_removes_the_capture_and_setup_restores_it(workdir: Path, pgapp: PgApp) -> None:
    pgapp.insert(1)
    write_config(workdir)
    assert _cli(workdir, "run", "--once").returncode == 0
    if pgapp.capture == "logical":
        probe = "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'vectorsync_app'"
        probe2 = "SELECT count(*) FROM pg_publication WHERE pubname = 'vectorsync_app'"
    else:
        probe = "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'vectorsync_app%'"
        probe2 = "SELECT count(*) FROM pg_class WHERE relname = 'vectorsync_app_outbox'"
    assert pgapp.execute(probe)[0][0] > 0 and pgapp.execute(probe2)[0][0] == 1
    done = _cli(workdir, "teardown")
    assert done.returncode == 0, done.stderr
    assert pgapp.execute(probe)[0][0] == 0 and pgapp.execute(probe2)[0][0] == 0
    # nothing of vectorsync's is left in the database: not even its schema
    assert pgapp.execute("SELECT to_regnamespace('vectorsync')")[0][0] is None
    pgapp.insert(2)
    done = _cli(workdir, "run", "--once")  # set up again: a new snapshot catches up
    assert done.returncode == 0, done.stderr
    asyncio.run(check(workdir / "vectorsync.toml", pgapp))


@pytest.mark.parametrize("mode", ["logical", "outbox"])
async def test_the_capture_epoch_is_new_at_each_install(pg_url: str, mode: str) -> None:
    """ "" while no capture is installed; the same across setups and reopening; a new one
    after teardown + setup, or once the slot / outbox was removed behind our back."""
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("CREATE TABLE docs (id integer PRIMARY KEY, body text)")
        specs = [TableSpec(table="docs", key="id")]
        source = pg_source.PostgresSource("app", pg_url, capture=mode)  # type: ignore[arg-type]
        await source.open()
        try:
            assert await source.epoch() == ""  # nothing of vectorsync's in the database yet
            await source.setup(specs)
            first = await source.epoch()
            assert len(first) == 32
            await source.setup(specs)
            assert await source.epoch() == first
            await source.close()
            source = pg_source.PostgresSource("app", pg_url, capture=mode)  # type: ignore[arg-type]
            await source.open()
            assert await source.epoch() == first
            await source.teardown()
            assert await source.epoch() == ""
            await source.setup(specs)
            second = await source.epoch()
            assert second not in ("", first)

            if mode == "logical":
                db.execute("SELECT pg_drop_replication_slot('vectorsync_app')")
            else:
                db.execute("DROP TABLE vectorsync.vectorsync_app_outbox")
                db.execute("DROP SEQUENCE vectorsync.vectorsync_app_pos")
            assert await source.epoch() == ""
            await source.setup(specs)
            third = await source.epoch()
            assert third not in ("", first, second)
            db.execute("INSERT INTO docs VALUES (1, 'captured')")
            await source.head()  # logical: the stream has reached the insert
            changes = await source.read_changes(0, 10)
            assert [(c.key, c.op) for c in changes] == [(1, "insert")]

            db.execute("DELETE FROM vectorsync.captures")  # as an install from before epochs
            assert await source.epoch() == ""
            await source.setup(specs)
            assert await source.epoch() not in ("", first, second, third)
            await source.teardown()
            assert await source.epoch() == ""
        finally:
            await source.close()


def test_the_password_never_appears_in_output_logs_or_state(workdir: Path, pgapp: PgApp) -> None:
    pgapp.insert(1)
    pgapp.insert(2, title=None, body=None)  # a dead letter with its row in the state store
    write_config(workdir)
    outputs = [
        _cli(workdir, "run", "--once", "--verbose", "--log-format", "json"),
        _cli(workdir, "status"),
        _cli(workdir, "status", "--json"),
        _cli(workdir, "runs", "--json"),
        _cli(workdir, "dlq", "list"),
    ]
    bad_url = pgapp.url.replace(PASSWORD, "not-the-password")
    wrong = _cli(workdir, "status", env={"VECTORSYNC_SOURCES__APP__URL": bad_url})
    assert wrong.returncode == 1 and "password authentication failed" in wrong.stderr
    assert "***" in wrong.stderr or "127.0.0.1" in wrong.stderr
    bad_kind = _cli(
        workdir, "status", env={"VECTORSYNC_SOURCES__APP__URL": "mysql://u:" + PASSWORD + "@h/d"}
    )
    assert bad_kind.returncode == 2
    for done in [*outputs, wrong, bad_kind]:
        assert PASSWORD not in done.stdout + done.stderr, done.args
    assert all(done.returncode == 0 for done in outputs), [o.stderr for o in outputs]
    for path in (workdir / ".vectorsync").rglob("*"):
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path


async def test_postgres_as_the_state_store(workdir: Path, pg: PgServer) -> None:
    from tests.helpers import App

    state_url = pg.create_database("vs_state")
    app = App(workdir / "app.db")
    try:
        rng = random.Random(3)
        app.random_ops(rng, 200)
        app.insert(999, title=None, body=None)  # a dead letter
        cfg = write_config(workdir, batch_size=40)
        cfg.write_text(
            cfg.read_text().replace(
                'url = "sqlite:///.vectorsync/state.db"', f'url = "{state_url}"'
            )
        )
        counts = await sync_once(cfg)
        assert counts["failed"] == 1
        async with Engine.open(load(cfg)) as engine:
            [status] = await engine.status()
            assert status.dead_letters == 1 and status.records == len(app.rows()) - 1
        app.update(999, title="fixed", body="fixed")
        app.random_ops(rng, 200)
        await sync_once(cfg)
        await check(cfg, app)
        async with Engine.open(load(cfg)) as engine:
            [status] = await engine.status()
            assert status.dead_letters == 0 and status.records == len(app.rows())
            assert len(await engine.state.runs()) == 2
        with psycopg.connect(state_url, autocommit=True) as db:
            assert db.execute(
                "SELECT value FROM vs_meta WHERE name = 'schema_version'"
            ).fetchone() == (str(SCHEMA_VERSION),)
            db.execute("UPDATE vs_meta SET value = '999' WHERE name = 'schema_version'")
        with pytest.raises(PermanentError, match="newer than this vectorsync"):
            async with Engine.open(load(cfg)):
                pass
    finally:
        app.close()
        with pg.admin() as conn:
            conn.execute('DROP DATABASE IF EXISTS "vs_state" WITH (FORCE)')
