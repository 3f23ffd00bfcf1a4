"""Hardening defects, each proven engine-level against real stores (SQLite, PostgreSQL,
FalkorDB sources; qdrant-edge unless a test says otherwise): capture re-installed,
poison-pill keys, fenced commits, checks around dead letters, long text, retry incidents,
one engine opened by two callers at once."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import App, assert_edge_converged, load, read_sink, sync_once, write_config
from vectorsync.backoff import Backoff
from vectorsync.engine import Engine
from vectorsync.errors import PermanentError, SinkError
from vectorsync.model import Point, point_id
from vectorsync.sinks.memory import MemorySink
from vectorsync.sinks.qdrant_edge import QdrantEdgeSink
from vectorsync.state.store import BatchCommit, StateStore

COLLECTION = "articles"


async def _until(read: Callable[[], Awaitable[Any]], ok: Callable[[Any], bool]) -> Any:
    deadline = time.monotonic() + 60
    while not ok(value := await read()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met before the deadline (last value {value!r})")
        await asyncio.sleep(0.05)
    return value


async def _edge_points(workdir: Path) -> dict[str, Any]:
    sink = QdrantEdgeSink("look", workdir / ".vectorsync" / "qdrant")
    await sink.open()
    try:
        return await read_sink(sink, COLLECTION)
    finally:
        await sink.close()


# -- 4: teardown then setup ---------------------------------------------------------------
@pytest.mark.all_sources
async def test_changes_after_teardown_and_setup_all_arrive(workdir: Path, app: App) -> None:
    cfg = write_config(workdir)
    await sync_once(cfg)  # capture installed
    with app.transaction():
        for k in range(1, 31):
            app.insert(k)
    with app.transaction():
        for k in range(1, 31):  # the feed's positions climb well past the row count
            app.update(k, body=f"first edit of {k}")
    await sync_once(cfg)
    async with Engine.open(load(cfg)) as engine:
        await engine.teardown()
    async with Engine.open(load(cfg)) as engine:
        await engine.prepare()  # `vectorsync setup`: a new feed, numbered from its start
    with app.transaction():
        for k in range(31, 36):
            app.insert(k)
    for k in range(1, 6):
        app.update(k, body=f"after setup {k}")
    for k in range(6, 11):
        app.delete(k)
    app.update(11, author="bob", published=2031)  # payload only
    await sync_once(cfg)
    await assert_edge_converged(load(cfg), app, workdir)


# -- 6: keys that cannot identify a record are dead-lettered -------------------------------
def _text_key_db(workdir: Path) -> sqlite3.Connection:
    db = sqlite3.connect(workdir / "app.db", isolation_level=None)
    db.execute(
        "CREATE TABLE articles (id TEXT PRIMARY KEY, title TEXT, body TEXT, author TEXT, "
        "tags TEXT, published INTEGER)"
    )
    return db


def _add(db: sqlite3.Connection, key: Any) -> None:
    db.execute("INSERT INTO articles VALUES (?, 'a title', 'a body', 'ann', 'a', 2020)", (key,))


async def test_a_null_key_is_dead_lettered_and_the_other_rows_sync(workdir: Path) -> None:
    db = _text_key_db(workdir)
    cfg = write_config(workdir)
    await sync_once(cfg)  # capture installed on the empty table
    for key in ("a", None, "b"):  # SQLite lets a TEXT PRIMARY KEY hold NULL
        _add(db, key)
    counts = await sync_once(cfg)
    async with Engine.open(load(cfg)) as engine:
        letters = await engine.state.dead_letters(status=None)
    assert counts["failed"] == 1
    [letter] = letters
    assert letter.error_type == "validation" and "NULL" in letter.message, letter
    points = await _edge_points(workdir)
    assert set(points) == {point_id("articles", "a"), point_id("articles", "b")}


async def test_a_blob_key_is_dead_lettered_without_a_crash_loop(workdir: Path) -> None:
    db = _text_key_db(workdir)
    cfg = write_config(workdir)
    await sync_once(cfg)
    _add(db, "a")
    _add(db, b"\x00\xff")  # a BLOB in a TEXT PRIMARY KEY column stays a BLOB
    first = await sync_once(cfg)
    _add(db, "b")
    second = await sync_once(cfg)  # the bad key does not come back to stop the sync
    async with Engine.open(load(cfg)) as engine:
        letters = await engine.state.dead_letters(status=None)
        [status] = await engine.status()
    assert first["failed"] == 1 and second.get("failed", 0) == 0
    [letter] = letters
    assert letter.error_type == "validation" and "bytes" in letter.message, letter
    assert status.position == status.head and status.records == 2
    points = await _edge_points(workdir)  # no orphan point for the bad key
    assert set(points) == {point_id("articles", "a"), point_id("articles", "b")}


# -- 8: one runner per source, fenced commits -----------------------------------------------
async def test_a_commit_after_the_lease_was_taken_over_writes_nothing(
    workdir: Path, app: App
) -> None:
    for k in range(1, 6):
        app.insert(k)
    cfg = write_config(workdir)
    async with Engine.open(load(cfg)) as engine:
        engine.heartbeat_interval = 3600  # no renewal: only the batch commit meets the fence
        stop = asyncio.Event()
        streaming = asyncio.create_task(engine.run(stop=stop))
        try:
            await _until(lambda: engine.state.position("app"), lambda p: p >= 5)
            # the runner stalls past its lease; a successor takes the source over
            db = sqlite3.connect(workdir / ".vectorsync" / "state.db", isolation_level=None)
            db.execute("UPDATE leases SET expires_at = 0 WHERE name = 'source:app'")
            db.close()
            successor = StateStore(load(cfg).state_url())
            await successor.open()
            try:
                token = await successor.acquire_lease("source:app", "successor", ttl=600)
            finally:
                await successor.close()
            app.insert(6)
            with pytest.raises(PermanentError, match="lost its lease") as lost:
                await asyncio.wait_for(streaming, 60)
        finally:
            stop.set()
            if not streaming.done():
                streaming.cancel()
            await asyncio.gather(streaming, return_exceptions=True)
        assert type(lost.value).__name__ == "LeaseLost"
        assert token == 2
        assert await engine.state.position("app") == 5
        assert await engine.state.record_states("articles", ["6"]) == {}
        counts = await engine.state.mapping_counts("articles")
    assert counts.records == 5 and counts.counters["upserted"] == 5


async def test_a_position_never_moves_backwards(workdir: Path) -> None:
    store = StateStore(f"sqlite:///{workdir / 'state.db'}")
    await store.open()
    try:
        await store.commit(BatchCommit(source="app", position=10))
        await store.commit(BatchCommit(source="app", position=4))  # a late, older batch
        assert await store.position("app") == 10
        await store.commit(BatchCommit(source="app", position=12))
        assert await store.position("app") == 12
    finally:
        await store.close()


# -- 9: every check mode knows dead-lettered records ----------------------------------------
async def test_check_modes_agree_on_dead_letters_and_repair_keeps_the_kept_point(
    workdir: Path, app: App
) -> None:
    for k in range(1, 21):
        app.insert(k)
    app.insert(21, title=None, body=None)  # (a) dead-lettered before its first sync
    cfg = write_config(workdir)
    await sync_once(cfg)
    app.update(5, title=None, body=None)  # (b) went bad after a good sync: its point stays
    await sync_once(cfg)
    kept = point_id("articles", 5)
    assert kept in await _edge_points(workdir)
    async with Engine.open(load(cfg)) as engine:
        for mode in ("full", "sample", "quick", "prove"):
            report = await engine.check("articles", mode=mode, seed=1)
            listed = report.as_dict()["keys"]
            assert report.consistent, (mode, report.as_dict())
            assert sorted(listed.get("dead_lettered", [])) == [5, 21], (mode, listed)
    sink = QdrantEdgeSink("drift", workdir / ".vectorsync" / "qdrant")
    await sink.open()
    await read_sink(sink, COLLECTION)
    await sink.delete(COLLECTION, [point_id("articles", 3)])  # drift, so a repair runs
    await sink.close()
    async with Engine.open(load(cfg)) as engine:
        report = await engine.check("articles", mode="full")
        assert not report.consistent and report.keys("missing") == [3]
        await engine.repair(report)
        after = await engine.check("articles", mode="full")
    assert after.consistent, after.as_dict()
    points = await _edge_points(workdir)
    assert kept in points and point_id("articles", 3) in points


# -- 10: long text ---------------------------------------------------------------------------
async def test_long_text_is_embedded_truncated_counted_and_logged_once(
    workdir: Path, app: App, caplog: pytest.LogCaptureFixture
) -> None:
    app.insert(1, body="short")
    app.insert(2, body="x" * 500)
    app.insert(3, body="y" * 500)
    cfg = write_config(workdir, extra_mapping="max_text_length = 100")
    with caplog.at_level(logging.WARNING, logger="vectorsync"):
        counts = await sync_once(cfg)
    async with Engine.open(load(cfg)) as engine:
        [status] = await engine.status()
        letters = await engine.state.dead_letters(status=None)
    assert counts.get("failed", 0) == 0 and letters == []
    assert status.counters["truncated"] == 2
    logged = [r for r in caplog.records if getattr(r, "action", None) == "text_truncated"]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    # the points hold the vectors of the cut text (the helper's renderer cuts the same way)
    await assert_edge_converged(load(cfg), app, workdir)


async def test_long_text_is_dead_lettered_when_configured(workdir: Path, app: App) -> None:
    app.insert(1, body="short")
    app.insert(2, body="x" * 500)
    cfg = write_config(workdir, extra_mapping='max_text_length = 100\nlong_text = "dead_letter"')
    counts = await sync_once(cfg)
    async with Engine.open(load(cfg)) as engine:
        letters = await engine.state.dead_letters(status=None)
    assert counts["failed"] == 1
    [letter] = letters
    assert letter.key == "2" and "max_text_length=100" in letter.message
    assert set(await _edge_points(workdir)) == {point_id("articles", 1)}


# -- 14: a retry incident keeps every message -------------------------------------------------
def _timed_out() -> SinkError:
    """A sink error wrapping a timeout whose message is empty, as asyncio's often is."""
    error = SinkError("")
    error.__cause__ = TimeoutError()
    return error


class FaultySink(MemorySink):
    """Fails its first upserts with the errors queued in ``faults``, then works."""

    def __init__(self, faults: Sequence[Exception]) -> None:
        super().__init__("vectors")
        self.faults = list(faults)

    async def upsert(self, collection: str, points: Sequence[Point]) -> None:
        if self.faults:
            raise self.faults.pop(0)
        await super().upsert(collection, points)


async def _retry_incident(workdir: Path) -> Any:
    """The error-log incident of an upsert that failed with a 503, then a timeout, then
    went through."""
    cfg = load(write_config(workdir))
    sink = FaultySink([SinkError("HTTP 503: service unavailable", code="503"), _timed_out()])
    backoff = Backoff(initial=0.01, maximum=0.05, deadline=60)
    async with Engine.open(cfg, sinks={"vectors": sink}, backoff=backoff) as engine:
        result = await engine.run(once=True)
        errors = await engine.state.errors()
    assert result.counts["upserted"] == 1 and not sink.faults
    [incident] = [e for e in errors if e.details.get("operation", "").startswith("upsert")]
    assert incident.status == "resolved" and incident.retry_count == 2
    return incident


async def test_a_retry_incident_shows_its_latest_message_never_empty(
    workdir: Path, app: App
) -> None:
    app.insert(1)
    incident = await _retry_incident(workdir)
    assert "TimeoutError" in incident.message, incident.message


async def test_a_retry_incident_lists_every_message(workdir: Path, app: App) -> None:
    app.insert(1)
    incident = await _retry_incident(workdir)
    messages = [m["message"] for m in incident.details.get("messages", [])]
    assert any("503" in m for m in messages), incident.details
    assert any("TimeoutError" in m for m in messages), incident.details


# -- 16: one engine, two callers opening it at once --------------------------------------------
async def test_search_while_run_starts_shares_the_open_sink(workdir: Path, app: App) -> None:
    for k in range(1, 11):
        app.insert(k, body=f"gamma delta {k}")
    cfg = write_config(workdir)
    await sync_once(cfg)
    app.insert(11)
    async with Engine.open(load(cfg)) as engine:
        result, hits = await asyncio.gather(
            engine.run(once=True), engine.search("articles", "gamma delta", 3)
        )
    assert result.changes == 1 and result.counts["upserted"] == 1
    assert len(hits) == 3
