"""The journaled write API (engine.writer): strong and eventual writes, transactions,
compensation of a sink's permanent refusal, and kill -9 between journal, source and sinks."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    App,
    GraphApp,
    PgApp,
    RejectingSink,
    SurrealApp,
    check,
    load,
    streaming,
    sync_once,
    write_config,
)
from vectorsync.engine import Engine
from vectorsync.events import Compensated, Written
from vectorsync.model import point_id
from vectorsync.writer import WriteRejected

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", "postgres", "surrealdb", "falkordb"])
def wapp(request: pytest.FixtureRequest, workdir: Path) -> Iterator[App]:
    """The application database the writer writes: SQLite, PostgreSQL (outbox capture) or
    an embedded SurrealDB (in this process only: its file opens once), or FalkorDB."""
    application: App
    if request.param == "sqlite":
        application = App(workdir / "app.db")
    elif request.param == "surrealdb":
        application = SurrealApp(workdir / "kb")
    elif request.param == "falkordb":
        server = request.getfixturevalue("falkordb")
        application = GraphApp(server.url, request.getfixturevalue("graph_name"))
    else:
        application = PgApp(request.getfixturevalue("pg_url"), "outbox")
    (workdir / "source.toml").write_text(application.source_toml)
    try:
        yield application
    finally:
        application.close()


def _row(key: int, **values: Any) -> dict[str, Any]:
    return {
        "id": key,
        "title": f"title {key}",
        "body": f"body {key}",
        "author": "ann",
        "tags": "a",
        "published": 2020,
        **values,
    }


async def _hit(engine: Engine, key: int) -> list[Any]:
    return await engine.sinks["vectors"].retrieve("articles", [point_id("articles", key)])


async def test_strong_writes_are_found_the_moment_they_return(workdir: Path, wapp: App) -> None:
    cfg = write_config(workdir)
    async with Engine.open(load(cfg)) as engine:
        await engine.prepare()
        events = engine.events()
        async with streaming(engine), engine.writer("app") as w:
            found = 0
            for k in range(1, 101):
                await w.upsert("articles", _row(k, body=f"fresh body {k}"))
                [hit] = await _hit(engine, k)
                found += hit.payload["_vs_key"] == k
            await w.delete("articles", 100)
            assert await _hit(engine, 100) == []
        assert found == 100
        assert await engine.state.journaled() == []
        written = [e for e in events.drain() if isinstance(e, Written)]
        events.close()
    assert len(written) == 101 and written[0].consistency == "strong"
    assert set(wapp.rows()) == set(range(1, 100))
    await check(cfg, wapp)


async def test_eventual_returns_once_the_source_committed(workdir: Path, wapp: App) -> None:
    cfg = write_config(workdir)
    async with Engine.open(load(cfg)) as engine:
        await engine.prepare()
        async with engine.writer("app", consistency="eventual") as w:  # nothing streams
            await w.upsert("articles", _row(1))
            await w.upsert("articles", _row(2))
            await w.delete("articles", 2)
        assert set(wapp.rows()) == {1} and await engine.state.journaled() == []
    await sync_once(cfg)
    await check(cfg, wapp)


async def test_strong_without_a_sync_times_out_keeping_the_committed_write(
    workdir: Path, wapp: App
) -> None:
    cfg = write_config(workdir)
    async with Engine.open(load(cfg)) as engine:
        await engine.prepare()
        async with engine.writer("app", timeout=0.5) as w:  # nothing streams
            with pytest.raises(TimeoutError, match="not applied within"):
                await w.upsert("articles", _row(1))
        assert await engine.state.journaled() == []
    assert set(wapp.rows()) == {1}
    await sync_once(cfg)  # the sync carries it
    await check(cfg, wapp)


async def test_a_transaction_commits_together_at_the_source(workdir: Path, wapp: App) -> None:
    wapp.insert(3)
    cfg = write_config(workdir)
    async with Engine.open(load(cfg)) as engine:
        await engine.prepare()
        async with streaming(engine), engine.writer("app") as w:
            with pytest.raises(RuntimeError, match="boom"):
                async with w.transaction():
                    await w.upsert("articles", _row(1))
                    raise RuntimeError("boom")
            assert 1 not in wapp.rows()  # nothing of a failed block reached the source
            async with w.transaction():
                await w.upsert("articles", _row(1))
                await w.upsert("articles", _row(2))
                await w.delete("articles", 3)
                assert set(wapp.rows()) == {3}  # not before the block ends
            assert [len(await _hit(engine, k)) for k in (1, 2, 3)] == [1, 1, 0]
    assert set(wapp.rows()) == {1, 2}
    await check(cfg, wapp)


async def test_undo_restores_the_source_row_and_raises(workdir: Path, wapp: App) -> None:
    wapp.insert(1, title="the original")
    sink = RejectingSink("author", "bad")
    async with Engine.open(load(write_config(workdir)), sinks={"vectors": sink}) as engine:
        await engine.prepare()
        events = engine.events()
        async with streaming(engine), engine.writer("app", compensate="undo") as w:
            await engine.wait_for(await engine.head(), timeout=30)
            with pytest.raises(WriteRejected, match=r"'vectors'.*author 'bad'") as raised:
                await w.upsert("articles", _row(1, title="rejected", author="bad"))
            with pytest.raises(WriteRejected):
                await w.upsert("articles", _row(2, author="bad"))  # no row before: deleted
            [hit] = await _hit(engine, 1)
        assert raised.value.sinks == ("vectors",)
        assert wapp.rows()[1]["title"] == "the original" and 2 not in wapp.rows()
        assert hit.payload["author"] != "bad"  # the sink has the restored row
        assert await engine.state.journaled() == []
        compensated = [e for e in events.drain() if isinstance(e, Compensated)]
        events.close()
    assert [(e.key, e.sinks) for e in compensated] == [("1", ("vectors",)), ("2", ("vectors",))]


async def test_dead_letter_keeps_the_write_and_records_the_reason(workdir: Path, wapp: App) -> None:
    sink = RejectingSink("author", "bad")
    async with Engine.open(load(write_config(workdir)), sinks={"vectors": sink}) as engine:
        await engine.prepare()
        events = engine.events()
        async with streaming(engine), engine.writer("app") as w:
            await w.upsert("articles", _row(1, author="bad"))
            [letter] = await engine.state.dead_letters("articles")  # there when it returns
        assert letter.key == "1" and "author 'bad'" in letter.message
        assert wapp.rows()[1]["author"] == "bad"  # the source keeps the write
        [written] = [e for e in events.drain() if isinstance(e, Written)]
        events.close()
    assert written.dead_lettered


@pytest.mark.parametrize("compensate", ["undo", "dead_letter"])
async def test_a_real_sinks_refusal_is_compensated(
    workdir: Path, compensate: str, pgvector: Any, pgvector_schema: str
) -> None:
    """PostgreSQL's jsonb holds no NUL character (SQLite's text does): the pgvector sink
    has the record refused for good, and the writer undoes or dead-letters it."""
    app = App(workdir / "app.db")
    try:
        app.insert(1, title="the original")
        sink = f'kind = "pgvector"\nurl = "{pgvector.url}"\nschema_name = "{pgvector_schema}"'
        async with Engine.open(load(write_config(workdir, sink=sink))) as engine:
            await engine.prepare()
            how: Any = compensate
            async with streaming(engine), engine.writer("app", compensate=how) as w:
                await engine.wait_for(await engine.head(), timeout=30)
                bad = _row(1, title="with a NUL", author="a\x00b")
                if compensate == "undo":
                    with pytest.raises(WriteRejected, match=r"'vectors'.*Unicode escape"):
                        await w.upsert("articles", bad)
                else:
                    await w.upsert("articles", bad)
                [point] = await _hit(engine, 1)
                letters = await engine.state.dead_letters("articles")
        if compensate == "undo":
            assert app.rows()[1]["title"] == "the original"
            assert point.payload["author"] == "ann"  # the restored row
        else:
            [letter] = letters
            assert letter.key == "1" and "unsupported Unicode escape" in letter.message
            assert app.rows()[1]["author"] == "a\x00b"  # the source keeps the write
            assert point.payload["author"] == "ann"  # the last good point stays
    finally:
        app.close()


def _child(workdir: Path, key: int, failpoint: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VECTORSYNC_FAILPOINT": failpoint}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src")])
    return subprocess.run(
        [sys.executable, "-m", "tests.e2e.writer_child", str(key)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("point", ["writer_after_journal", "writer_after_source"])
async def test_kill_9_in_a_write_then_restart_converges(
    workdir: Path, wapp: App, point: str, request: pytest.FixtureRequest
) -> None:
    wapp.insert(1)
    cfg = write_config(workdir)
    await sync_once(cfg)
    embedded = isinstance(wapp, SurrealApp)
    if embedded:  # an embedded file opens in one process: the child's now
        wapp.close()
    done = _child(workdir, 7, point)
    assert done.returncode == -9 and f"failpoint {point} fired" in done.stderr, done.stderr
    if embedded:
        wapp = SurrealApp(workdir / "kb")  # reopened after the kill
        request.addfinalizer(wapp.close)
    async with Engine.open(load(cfg)) as engine:
        [entry] = await engine.state.journaled()  # the crash left its journal entry
        assert entry.key == 7 and entry.before is None
    await sync_once(cfg)  # the restart: recovery, then the sync
    async with Engine.open(load(cfg)) as engine:
        assert await engine.state.journaled() == []
    # before the source write: dropped (never acknowledged); after it: the sync carried it
    assert (7 in wapp.rows()) == (point == "writer_after_source")
    await check(cfg, wapp)
