"""Scale-out trials with real processes: ``vectorsync capture`` and ``vectorsync worker``
started as the CLI, killed -9 (a worker under load, the capture between publishing and
acknowledging the source), and the bus server killed and restarted; afterwards the sink
equals the source, with exactly one point per row."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import App, load
from tests.integration.test_scaleout import converged, scaled, setup
from tests.kafka_server import KafkaServer
from tests.redis_server import RedisServer
from vectorsync._failpoints import POINTS
from vectorsync._processes import stop_process
from vectorsync.bus.kafka import KafkaBus
from vectorsync.engine import Engine
from vectorsync.model import Change

ROOT = Path(__file__).resolve().parents[2]


class Roles:
    """The processes a test starts, stopped (or found dead) at its end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, which: str, failpoint: str | None = None) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
        if failpoint:
            env["VECTORSYNC_FAILPOINT"] = failpoint
        log = self.workdir / f"{which}-{len(self.procs)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "vectorsync", which, "-v", "--log-format", "json"],
                cwd=self.workdir,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs.append((proc, log))
        return proc

    def stop(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in self.procs:
            stop_process(proc, timeout=30)

    def lines(self) -> list[dict[str, Any]]:
        found = []
        for proc, log in self.procs:  # each line tagged with its process
            for line in log.read_text(errors="replace").splitlines():
                if not line.startswith("{"):
                    continue
                try:
                    found.append({**json.loads(line), "_pid": proc.pid})
                except json.JSONDecodeError:  # the line being written as we read
                    continue
        return found

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return next(log for p, log in self.procs if p is proc).read_text(errors="replace")


@pytest.fixture
def roles(workdir: Path) -> Iterator[Roles]:
    started = Roles(workdir)
    try:
        yield started
    finally:
        started.stop()


def wait_until(condition: Any, what: str, deadline: float = 120) -> None:
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(f"{what}: not before the deadline")
        time.sleep(0.1)


def commits(roles: Roles) -> list[dict[str, Any]]:
    return [line for line in roles.lines() if line.get("action") == "batch_commit"]


def _status(cfg: Path) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        async with Engine.open(load(cfg)) as engine:
            return (await engine.scaleout_status()).as_dict()

    return asyncio.run(read())


@pytest.mark.parametrize("broker", ["redis", "kafka"])
def test_kill_9_of_one_of_three_workers_under_load(
    workdir: Path,
    broker: str,
    request: pytest.FixtureRequest,
    pg_url: str,
    sink: str,
    sapp: App,
    roles: Roles,
) -> None:
    bus = request.getfixturevalue("bus" if broker == "redis" else "kafka")
    cfg = scaled(workdir, bus, pg_url, sink, partitions=6)
    cfg.write_text(cfg.read_text().replace("[sync]", "[sync]\nmax_in_flight = 1"))
    asyncio.run(setup(cfg))
    roles.start("capture")
    workers = [roles.start("worker") for _ in range(3)]

    def balanced() -> bool:  # each worker holds 2 of the 6 partitions
        status = _status(cfg)
        held = [v["worker"] for v in status["partitions"]["app"].values()]
        return len(status["workers"]) == 3 and all(held.count(w) == 2 for w in status["workers"])

    wait_until(balanced, "three workers share the partitions")
    with sapp.transaction():  # then the load: about 1,000 rows for each worker
        for k in range(1, 3001):
            sapp.insert(k)
    wait_until(lambda: len({c["_pid"] for c in commits(roles)}) == 3, "all three workers commit")
    victim = workers[0]
    held = len(
        [line for line in roles.lines() if line.get("action") == "partition_taken"
         and line["_pid"] == victim.pid]
    )  # fmt: skip
    assert held >= 1  # it held partitions, and had work left in them
    victim.kill()  # SIGKILL, mid-stream: 3,000 rows are far from synced yet
    victim.wait()
    killed = time.monotonic()

    def taken_over() -> bool:
        status = _status(cfg)
        held = [v["worker"] for v in status["partitions"]["app"].values()]
        return len(status["workers"]) == 2 and all(w in status["workers"] for w in held)

    wait_until(taken_over, "the survivors hold every partition")
    print(f"takeover after kill -9: {time.monotonic() - killed:.1f}s")  # quoted in notes
    for k in range(1, 201):
        sapp.update(k, body=f"edited after the kill {k}")
    asyncio.run(converged(cfg, sapp, deadline=300))  # exactly one point per live row
    status = _status(cfg)
    assert len(status["workers"]) == 2
    assert all(v["worker"] in status["workers"] for v in status["partitions"]["app"].values())
    embedded = sum(c.get("embedded", 0) for c in commits(roles))
    # each partition the killed worker held may lose its one uncommitted batch (50 texts)
    assert embedded <= 3000 + 200 + 50 * held, (embedded, held)


def test_kill_9_of_the_capture_its_standby_takes_over(
    workdir: Path, bus: RedisServer, pg_url: str, sink: str, sapp: App, roles: Roles
) -> None:
    cfg = scaled(workdir, bus, pg_url, sink)
    asyncio.run(setup(cfg))
    first = roles.start("capture", failpoint="capture_after_publish:3")
    wait_until(lambda: _status(cfg)["capture"]["app"] is not None, "the capture holds its lease")
    holder = _status(cfg)["capture"]["app"]
    standby = roles.start("capture")
    roles.start("worker")
    with sapp.transaction():
        for k in range(1, 1001):  # 20 batches: the first capture dies after its third publish
            sapp.insert(k)
    first.wait(timeout=120)
    died = time.monotonic()
    assert first.returncode == -9 and "capture_after_publish fired" in roles.log(first)
    wait_until(lambda: _status(cfg)["capture"]["app"] not in (None, holder), "the standby captures")
    print(f"capture takeover after kill -9: {time.monotonic() - died:.1f}s")  # quoted in notes
    for k in range(1001, 1101):
        sapp.insert(k)
    asyncio.run(converged(cfg, sapp, deadline=300))
    assert standby.poll() is None
    [took] = [line for line in roles.lines() if line.get("action") == "capture_start"
              and line["_pid"] == standby.pid]  # fmt: skip
    assert took["source"] == "app"


@pytest.mark.parametrize("broker", ["redis", "kafka"])
def test_the_bus_server_killed_and_restarted_mid_stream_loses_nothing(
    workdir: Path,
    broker: str,
    request: pytest.FixtureRequest,
    pg_url: str,
    sink: str,
    sapp: App,
    roles: Roles,
) -> None:
    # Redis: append-only, fsync always; Kafka: Tansu on S3 storage (an emulator that lives on)
    bus: RedisServer | KafkaServer = request.getfixturevalue(
        "bus" if broker == "redis" else "durable_kafka"
    )
    with sapp.transaction():
        for k in range(1, 1001):
            sapp.insert(k)
    cfg = scaled(workdir, bus, pg_url, sink)
    asyncio.run(setup(cfg))
    roles.start("capture")
    roles.start("worker")
    roles.start("worker")
    wait_until(lambda: commits(roles), "a first commit")
    bus.kill()  # SIGKILL: what it acknowledged is in its durable storage
    for k in range(1001, 1201):
        sapp.insert(k)
    for k in range(1, 101):
        sapp.update(k, body=f"edited while the bus was down {k}")
    bus.start()
    restarted = time.monotonic()
    asyncio.run(converged(cfg, sapp, deadline=300))
    print(f"{broker}: converged {time.monotonic() - restarted:.1f}s after the restart")  # notes
    assert all(p.poll() is None for p, _ in roles.procs)  # every role lived through it


async def test_the_kafka_bus_on_durable_storage_keeps_its_end_through_a_restart(
    durable_kafka: KafkaServer,
) -> None:
    """What the trial above relies on, at the bus: bursts of entries (many within one
    second, the resolution of S3's modification times; one stored object each, which the
    broker lists at each fetch) all read back, head and capture position included, before
    and after the broker is killed and started again."""

    def entry(k: int) -> dict[int, list[Change]]:
        return {0: [Change(table="t", key=k, op="upsert", position=k)]}

    async def check(bus: KafkaBus) -> None:
        assert await bus.captured("app") == ("e", 150)
        assert await bus.head("app", 0) == 150 and await bus.head("app", 1) == 0
        read, after = [], 0
        while got := await bus.read("app", 0, after, 100):
            read += [c.key for c in got]
            after = got[-1].position
        assert read == list(range(1, 151)) and after == 150
        assert await bus.read("app", 0, 150, 100) == []

    bus = KafkaBus(durable_kafka.url, partitions=2)
    await bus.open()
    try:
        for k in range(1, 151):
            await bus.publish("app", "e", k, entry(k))
        await check(bus)
    finally:
        await bus.close()
    durable_kafka.kill()
    durable_kafka.start()
    bus = KafkaBus(durable_kafka.url, partitions=2)
    await bus.open()
    try:
        await check(bus)
    finally:
        await bus.close()


@pytest.mark.parametrize("point", [p for p in POINTS if p != "after_redo_inflight"])
def test_a_worker_killed_at_each_failpoint_is_taken_over(
    workdir: Path,
    bus: RedisServer,
    pg_url: str,
    sink: str,
    sapp: App,
    roles: Roles,
    point: str,
) -> None:
    rng = random.Random(POINTS.index(point))  # type: ignore[arg-type]
    sapp.random_ops(rng, 300)
    cfg = scaled(workdir, bus, pg_url, sink, partitions=4)
    asyncio.run(setup(cfg))
    roles.start("capture")
    doomed = roles.start("worker", failpoint=f"{point}:2")
    doomed.wait(timeout=120)  # it dies the second time it passes the point
    assert doomed.returncode == -9 and f"failpoint {point} fired" in roles.log(doomed)
    roles.start("worker")  # takes over every partition from their last commits
    sapp.random_ops(rng, 100)
    asyncio.run(converged(cfg, sapp, deadline=300))
