"""Sync metadata against real SQLite and qdrant-edge: runs, schema registry, error log,
dead letters, position markers, statistics, retention, and a transient sink outage."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.helpers import App, assert_edge_converged, load, write_config
from vectorsync.backoff import Backoff
from vectorsync.engine import Engine
from vectorsync.errors import SinkError
from vectorsync.model import PayloadUpdate, Point
from vectorsync.sinks.qdrant_edge import QdrantEdgeSink

FAULTY_TEXT = "{{ title }}\\n{{ body }}{% if published == 0 %}{{ 1 // published }}{% endif %}"


async def test_a_run_fills_every_field_of_its_record(workdir: Path, app: App) -> None:
    for k in range(1, 11):
        app.insert(k)
    app.update(2, title=None, body=None)  # dead-lettered
    cfg = write_config(workdir)
    async with Engine.open(load(cfg)) as engine:
        first = await engine.run(once=True)
        app.update(3, body="new body")  # updated
        app.update(4, author="zed")  # payload-only
        app.delete(5)  # deleted
        app.insert(11)  # inserted
        second = await engine.run(once=True)
        [run2, run1] = await engine.state.runs(limit=2)
    assert (run1.id, run2.id) == (first.run_id, second.run_id)
    assert run1.mode == "once" and run1.status == "completed"
    assert run1.counts == {
        "processed": 10,
        "inserted": 9,
        "updated": 0,
        "payload_only": 0,
        "deleted": 0,
        "embedded": 9,
        "skipped": 0,
        "failed": 1,
        "bytes": run1.counts["bytes"],
        "tokens": 0,  # the hash embedder is not billed by the token
    }
    assert run1.cost is None
    assert run1.counts["bytes"] > 100
    assert run2.counts["inserted"] == 1 and run2.counts["updated"] == 1
    assert run2.counts["payload_only"] == 1 and run2.counts["deleted"] == 1
    for run in (run1, run2):
        assert run.completed_at is not None and run.completed_at >= run.started_at
        assert run.duration_ms is not None and run.duration_ms >= 0
        assert len(run.config_hash) == 16 and run.instance_id and run.host and run.pid
        assert run.source_info == {
            "app": {"kind": "sqlite", "path": "app.db", "poll_interval": 0.05}
        }
        assert run.destination_info["vectors"]["kind"] == "qdrant-edge"
        assert run.error_message is None


async def test_schema_registry_records_each_evolution(workdir: Path, app: App) -> None:
    app.insert(1)
    cfg = workdir / "vectorsync.toml"

    async def sync(**config: Any) -> None:
        write_config(workdir, **config)
        async with Engine.open(load(cfg)) as engine:
            await engine.run(once=True)

    await sync()
    await sync(text="{{ title }}: {{ body }}")
    app.db.execute("ALTER TABLE articles ADD COLUMN summary TEXT")
    await sync(text="{{ title }}: {{ body }}")
    app.db.execute("ALTER TABLE articles DROP COLUMN summary")
    await sync(text="{{ title }}: {{ body }}")
    await sync(
        text="{{ title }}: {{ body }}",
        extra_mapping='collection = "articles256"\nembedder = "small"\n'
        '[embedders.small]\nkind = "hash"\ndimension = 256',
    )
    async with Engine.open(load(cfg)) as engine:
        versions = await engine.state.schema_versions("articles")
    assert [v["evolution"] for v in versions] == [
        "create",
        "template_change",
        "add_column",
        "drop_column",
        "model_change",
    ]
    assert [v["previous_version"] for v in versions] == [None, 1, 2, 3, 4]
    assert versions[2]["definition"]["columns"]["summary"] == "TEXT"
    assert all(len(v["hash"]) == 16 and v["created_at"] > 0 for v in versions)


async def test_type_change_is_detected(workdir: Path) -> None:
    db = sqlite3.connect(workdir / "app.db")
    db.execute(
        "CREATE TABLE articles (id INTEGER PRIMARY KEY, title TEXT, body TEXT, "
        "author TEXT, tags TEXT, published INTEGER)"
    )
    db.execute("INSERT INTO articles VALUES (1, 't', 'b', 'a', 'x', 2020)")
    db.commit()
    cfg = write_config(workdir)
    async with Engine.open(load(cfg)) as engine:
        await engine.run(once=True)
    db.executescript("""
        ALTER TABLE articles RENAME TO old;
        CREATE TABLE articles (id INTEGER PRIMARY KEY, title TEXT, body TEXT, author TEXT,
                               tags TEXT, published TEXT);
        INSERT INTO articles SELECT * FROM old; DROP TABLE old;""")
    db.close()
    async with Engine.open(load(cfg)) as engine:
        await engine.prepare()
        versions = await engine.state.schema_versions("articles")
    assert versions[-1]["evolution"] == "type_change"


async def test_error_log_and_dead_letters_carry_the_record_and_resolve(
    workdir: Path, app: App
) -> None:
    for k in range(1, 6):
        app.insert(k)
    app.update(3, published=0)
    cfg = write_config(workdir, text=FAULTY_TEXT)
    async with Engine.open(load(cfg)) as engine:
        result = await engine.run(once=True)
        [letter] = await engine.state.dead_letters()
        [error] = await engine.state.errors()
        assert result.counts["failed"] == 1 and result.counts["upserted"] == 4
        assert letter.error_log_id == error.id and letter.run_id == result.run_id
        assert letter.operation == "snapshot" and letter.error_count == 1
        assert error.error_type == "render" and error.status == "open"
        assert error.mapping == "articles" and error.key == "3" and error.source == "app"
        assert error.record_data is not None and error.record_data["published"] == 0
        assert error.stack_trace and "ZeroDivisionError" in error.stack_trace
        assert error.run_id == result.run_id

        app.update(3, body="still broken")  # fails again: one dead letter, two errors
        await engine.run(once=True)
        [letter] = await engine.state.dead_letters()
        assert letter.error_count == 2

        app.update(3, published=2021)
        assert await engine.replay_dead_letters() == 1
        [letter] = await engine.state.dead_letters(status="processing")
        await engine.run(once=True)
        assert await engine.state.dead_letters() == []
        [resolved] = await engine.state.dead_letters(status="resolved")
        assert resolved.key == "3"
        assert {e.status for e in await engine.state.errors()} == {"resolved"}
        stats = await engine.state.statistics(hours=1)
    assert stats["runs"]["completed"] == 3 and stats["success_rate"] == 1.0
    assert stats["errors_by_type"] == {"render": 2}
    assert stats["dead_letters_pending"] == 0 and stats["dead_letters"] == {"resolved": 1}
    assert stats["records_processed"] >= 7 and stats["throughput_per_s"] > 0
    assert stats["average_run_seconds"] >= 0


async def test_positions_and_batch_timestamp_markers(workdir: Path, app: App) -> None:
    app.insert(1)
    cfg = write_config(workdir)
    when = datetime(2026, 11, 23, 10, 30, tzinfo=UTC)
    async with Engine.open(load(cfg)) as engine:
        result = await engine.run(once=True)
        state = engine.state
        assert await state.position("app") == 1
        await state.set_batch_timestamp("app", when, table="articles", run_id=result.run_id)
        await state.set_position("app", 7, table="articles")
        assert await state.batch_timestamp("app", "articles") == when
        assert await state.batch_timestamp("app") is None
        markers = {(m["source"], m["stream"], m["marker_type"]): m for m in await state.markers()}
    assert markers[("app", "", "stream")]["position"] == 1
    assert markers[("app", "", "stream")]["run_id"] == result.run_id
    assert markers[("app", "articles", "stream")]["position"] == 7
    assert markers[("app", "articles", "batch")]["position_data"] == when.isoformat()


async def test_retention_keeps_recent_history_and_ten_schema_versions(
    workdir: Path, app: App
) -> None:
    app.insert(1)
    for i in range(12):
        write_config(workdir, text=f"v{i} {{{{ title }}}}")
        async with Engine.open(load(workdir / "vectorsync.toml")) as engine:
            await engine.run(once=True)
    db = sqlite3.connect(workdir / ".vectorsync" / "state.db")
    db.execute("UPDATE sync_runs SET started_at = started_at - 40 * 86400 WHERE id <= 5")
    db.commit()
    db.close()
    async with Engine.open(load(workdir / "vectorsync.toml")) as engine:
        removed = await engine.state.cleanup(retention_days=30)
        versions = await engine.state.schema_versions("articles")
        remaining = await engine.state.runs(limit=100)
    assert removed["sync_runs"] == 5 and len(remaining) == 7
    # versions beyond the newest ten were already dropped by the retention at run start
    assert [v["version"] for v in versions] == list(range(3, 13))


class OutageSink(QdrantEdgeSink):
    """The real qdrant-edge sink behind a switch: while ``down``, every write fails the way
    a closed connection does (a retryable SinkError)."""

    down = False
    failures = 0

    def _gate(self) -> None:
        if self.down:
            self.failures += 1
            raise SinkError("sink unreachable (connection closed)", code="ECONNREFUSED")

    async def upsert(self, collection: str, points: Sequence[Point]) -> None:
        self._gate()
        await super().upsert(collection, points)

    async def update_payloads(self, collection: str, updates: Sequence[PayloadUpdate]) -> list[str]:
        self._gate()
        return await super().update_payloads(collection, updates)

    async def delete(self, collection: str, ids: Sequence[str]) -> None:
        self._gate()
        await super().delete(collection, ids)


async def test_a_sink_closed_for_5_seconds_under_load_costs_retries_not_records(
    workdir: Path, app: App
) -> None:
    app.random_ops(random.Random(1), 200)
    cfg = load(write_config(workdir, batch_size=50))
    sink = OutageSink("vectors", workdir / ".vectorsync" / "qdrant")
    stop_writing = threading.Event()

    def write_load() -> None:
        writer = App(workdir / "app.db")
        rng = random.Random(2)
        while not stop_writing.is_set():
            writer.random_ops(rng, 10)
            time.sleep(0.01)  # pacing the load, not synchronisation
        writer.close()

    backoff = Backoff(initial=0.05, maximum=0.5, deadline=60)
    async with Engine.open(cfg, sinks={"vectors": sink}, backoff=backoff) as engine:
        stop = asyncio.Event()
        streaming = asyncio.create_task(engine.run(stop=stop))
        loader = threading.Thread(target=write_load)
        loader.start()
        await _until(lambda: engine.state.position("app"), lambda p: p > 0)
        sink.down = True
        await asyncio.sleep(5)  # the outage itself lasts 5 s
        sink.down = False
        stop_writing.set()
        loader.join()
        head = await engine.sources["app"].head()
        await _until(lambda: engine.state.position("app"), lambda p: p >= head)
        stop.set()
        result = await streaming
        letters = await engine.state.dead_letters(status=None)
        errors = await engine.state.errors()
    assert sink.failures >= 3, "the outage never hit a write"
    assert letters == [] and result.counts.get("failed", 0) == 0
    sink_errors = [e for e in errors if e.error_type == "sink"]
    assert sink_errors and all(e.status == "resolved" and e.retry_count >= 1 for e in sink_errors)
    assert sink_errors[0].error_code == "ECONNREFUSED" and sink_errors[0].max_retries == 100
    await assert_edge_converged(cfg, app, workdir)


async def _until(read: Any, ok: Any, deadline: float = 60.0) -> None:
    end = time.monotonic() + deadline
    while not ok(await read()):
        if time.monotonic() > end:
            raise TimeoutError("condition not met before the deadline")
        await asyncio.sleep(0.05)


async def test_python_api_adds_dead_letters_and_recovers_runs(workdir: Path, app: App) -> None:
    from vectorsync.state.store import DeadLetter

    app.insert(1)
    cfg = write_config(workdir)
    async with Engine.open(load(cfg)) as engine:
        await engine.run(once=True)
        state = engine.state
        await state.add_dead_letters(
            "app",
            [
                DeadLetter(
                    mapping="articles",
                    key="1",
                    operation="update",
                    error_type="validation",
                    message="rejected by a downstream check",
                    details={"key": 1, "row": {"id": 1}},
                    position=1,
                )
            ],
        )
        [letter] = await state.dead_letters()
        [error] = await state.errors(status="open")
        assert letter.error_log_id == error.id and error.record_data == {"id": 1}
        # a run whose process is gone (another pid on this host that no longer exists)
        run_id = await state.start_run(
            mode="backfill", config_hash="x", instance_id="i", source_info={}, destination_info={}
        )
        db = sqlite3.connect(workdir / ".vectorsync" / "state.db")
        db.execute("UPDATE sync_runs SET pid = 2147483646 WHERE id = ?", (run_id,))
        db.commit()
        db.close()
        assert await engine.recover() == [run_id]
        [run] = await state.runs(run_id=run_id)
    assert run.status == "failed" and run.completed_at is not None
