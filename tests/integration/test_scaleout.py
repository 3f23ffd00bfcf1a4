"""Scale-out mode: a capture and workers over Redis Streams (a real, durable Redis the
test starts), PostgreSQL as the shared state store and pgvector as the sink many
processes write."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import App, check, load, sync_once, write_config
from tests.integration.test_related_sql import CONFIG, _points, documents_and_chunks
from tests.redis_server import RedisServer
from vectorsync.engine import Engine
from vectorsync.errors import ConfigError
from vectorsync.metrics import prometheus_text
from vectorsync.model import point_id


def scaled(workdir: Path, bus: Any, state: str, sink: str, partitions: int = 4) -> Path:
    """The project on a bus (a Redis or a Kafka-protocol server: its ``url`` says which)."""
    cfg = write_config(workdir, sink=sink, batch_size=50)
    text = cfg.read_text().replace('url = "sqlite:///.vectorsync/state.db"', f'url = "{state}"')
    kind = "kafka" if bus.url.startswith("kafka://") else "redis"
    text += f'\n[bus]\nkind = "{kind}"\nurl = "{bus.url}"\npartitions = {partitions}\n'
    text += "heartbeat = 0.2\n"
    cfg.write_text(text)
    return cfg


async def setup(cfg: Path) -> None:
    """`vectorsync setup`, as an operator runs it before starting the roles."""
    async with Engine.open(load(cfg)) as engine:
        await engine.prepare()


async def converged(cfg: Path, app: App, deadline: float = 120) -> None:
    end = time.monotonic() + deadline
    while True:
        try:
            await check(cfg, app)
            return
        except AssertionError:
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def role(cfg: Path, which: str) -> AsyncIterator[Engine]:
    """An engine playing ``capture`` or ``worker`` in this process until the block ends."""
    stop = asyncio.Event()
    async with Engine.open(load(cfg)) as engine:
        task = asyncio.create_task(
            getattr(engine, "capture" if which == "capture" else "work")(stop)
        )
        try:
            yield engine
        finally:
            stop.set()
            await task


async def test_a_capture_and_two_workers_share_the_partitions_and_converge(
    workdir: Path, bus: RedisServer, pg_url: str, sink: str, sapp: App
) -> None:
    for k in range(1, 201):
        sapp.insert(k)
    cfg = scaled(workdir, bus, pg_url, sink)
    await setup(cfg)
    async with role(cfg, "capture"), role(cfg, "worker") as one, role(cfg, "worker"):
        await converged(cfg, sapp)
        for k in range(1, 41):
            sapp.update(k, body=f"edited {k}")
        for k in range(41, 51):
            sapp.delete(k)
        for k in range(201, 221):
            sapp.insert(k)
        sapp.update(60, author="bob")
        await converged(cfg, sapp)

        async def balanced() -> dict[str, Any]:  # the share settles within a few beats
            end = time.monotonic() + 60
            while True:
                status = (await one.scaleout_status()).as_dict()
                holders = [v["worker"] for v in status["partitions"]["app"].values()]
                counts = sorted(holders.count(w) for w in status["workers"])
                if counts == [2, 2] or time.monotonic() > end:
                    return status
                await asyncio.sleep(0.1)

        status = await balanced()
        metrics = (await prometheus_text(one)).decode()
    assert len(status["workers"]) == 2
    assert "vectorsync_workers_alive 2.0" in metrics
    assert 'vectorsync_capture_active{source="app"} 1.0' in metrics
    assert metrics.count("vectorsync_bus_depth{") == 4
    assert 'vectorsync_partition_held{partition="0",source="app"} 1.0' in metrics
    holders = [v["worker"] for v in status["partitions"]["app"].values()]
    assert sorted(holders.count(w) for w in status["workers"]) == [2, 2]


async def test_several_workers_on_sqlite_state_are_refused(
    workdir: Path, bus: RedisServer, sink: str, sapp: App
) -> None:
    sapp.insert(1)
    cfg = scaled(workdir, bus, "sqlite:///.vectorsync/state.db", sink)
    async with role(cfg, "worker"), Engine.open(load(cfg)) as engine:
        with pytest.raises(ConfigError, match=r"shared state store.*postgresql"):
            await engine.work(asyncio.Event())


async def test_related_fields_fan_out_across_partitions(workdir: Path, bus: RedisServer) -> None:
    """A document's chunks live in other partitions than the document: the document's
    worker hands them to theirs, and every record built from a change is re-synced."""
    db = documents_and_chunks(workdir)
    cfg = workdir / "vectorsync.toml"
    cfg.write_text(f'{CONFIG}\n[bus]\nurl = "{bus.url}"\npartitions = 4\nheartbeat = 0.2\n')
    await sync_once(cfg)
    db.execute("UPDATE documents SET title = 'retitled' WHERE id = 2")
    db.execute("UPDATE chunks SET doc_id = 1 WHERE id = 305")  # moved: both documents change
    counts = await sync_once(cfg)
    # re-embedded: document 2 and its five chunks, chunk 305 (a document title is in a
    # chunk's text); documents 1 and 3 change their chunk list only
    assert (counts["embedded"], counts["payload_only"]) == (7, 2)
    chunks = await _points(workdir, "chunks")
    assert {chunks[point_id("chunks", 200 + c)]["doc_title"] for c in range(1, 6)} == {"retitled"}
    docs = await _points(workdir, "documents")
    assert docs[point_id("documents", 1)]["chunk_ids"] == [101, 102, 103, 104, 105, 305]
    assert docs[point_id("documents", 3)]["chunk_ids"] == [301, 302, 303, 304]
    async with Engine.open(load(cfg)) as engine:
        for mapping in ("chunks", "documents"):
            report = await engine.check(mapping, mode="full")
            assert report.consistent, (mapping, report.counts)


async def test_scale_out_roles_beside_a_running_run_are_refused(
    workdir: Path, bus: RedisServer, pg_url: str, sink: str, sapp: App
) -> None:
    sapp.insert(1)
    cfg = scaled(workdir, bus, pg_url, sink)
    async with Engine.open(load(cfg)) as running:
        stop = asyncio.Event()
        run = asyncio.create_task(running.run(stop=stop))
        end = time.monotonic() + 60
        while not [x for x in await running.state.leases() if x.name == "source:app"]:
            assert time.monotonic() < end, "the run takes its source lease"
            await asyncio.sleep(0.05)
        try:
            async with Engine.open(load(cfg)) as engine:
                for role in (engine.work, engine.capture):
                    with pytest.raises(ConfigError, match="synced by `vectorsync run`"):
                        await role(asyncio.Event())
        finally:
            stop.set()
            await run
