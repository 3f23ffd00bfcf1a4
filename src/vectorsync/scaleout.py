"""Scale-out mode: capture and apply split over a durable, partitioned change bus.

``vectorsync capture`` reads each source's change capture and publishes the change keys to
the bus, partitioned by key hash (bus/base.py); a standby capture waits on the source's
``capture:<source>`` lease and takes over when the holder dies. The source is acknowledged
only after the bus has the changes (and the capture's position, in the same transaction).

``vectorsync worker`` processes share the partitions: each worker beats a ``worker:<id>``
lease, counts the live workers and holds its fair share of ``partition:<source>:<n>``
leases; each partition it holds runs the usual level-triggered pipeline (re-read, render,
embed, write, record state) on :class:`PartitionSource`, whose positions are the
partition's and whose commits are fenced by the partition's lease, so one key is applied by
one worker at a time and a worker that lost its lease writes nothing more. A worker killed
mid-batch leaves its partitions' positions at their last commit; whoever takes them over
re-reads from there.

Related fields: a partition's worker fans a changed related record out to the records built
from it, and hands those of other partitions to them through the bus (``forward``), so
every key is still applied by its own partition. Not yet in this mode: re-index backfills
(use ``vectorsync run`` for a rebuild).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from . import _failpoints
from .backoff import retrying
from .bus.base import Bus, partition_of
from .embed.base import Loadable
from .errors import ConfigError, RetryableError
from .model import Change, Key
from .related import RelatedRecord, Relation
from .sources.base import Backlog, Source, TableSpec
from .state.leases import Lease, LeaseHeld, LeaseLost, pid_alive
from .worker import MappingRuntime, SourceWorker

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["PartitionSource", "ScaleOutStatus", "build_bus", "run_capture", "run_workers", "status"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


def build_bus(engine: Engine) -> Bus:
    cfg = engine.config.bus
    if cfg is None:
        raise ConfigError(
            'scale-out mode needs a bus: add [bus] with url = "redis://host:6379" (see '
            "docs/scale-out.md), or use `vectorsync run` (all in one process)"
        )
    if cfg.kind == "kafka":
        from .bus.kafka import KafkaBus

        return KafkaBus(cfg.url, partitions=cfg.partitions)
    from .bus.redis import RedisBus

    return RedisBus(cfg.url, partitions=cfg.partitions)


class PartitionSource:
    """One partition of a source's changes as a :class:`~vectorsync.sources.base.Source`:
    changes and positions come from the bus; rows, scans and relations from the source."""

    def __init__(self, source: Source, bus: Bus, partition: int) -> None:
        self.inner = source
        self.bus = bus
        self.partition = partition
        self.name = f"{source.name}#{partition}"  # its positions and in-flight records
        self._last = 0

    async def open(self) -> None:  # the engine opened the source and the bus
        pass

    async def close(self) -> None:
        pass

    async def columns(self, table: str) -> dict[str, str]:
        return await self.inner.columns(table)

    async def check_key(self, spec: TableSpec) -> None:
        await self.inner.check_key(spec)

    async def setup(self, tables: Sequence[TableSpec]) -> list[str]:
        return await self.inner.setup(tables)

    async def teardown(self) -> None:
        await self.inner.teardown()

    async def epoch(self) -> str:
        return (await self.bus.captured(self.inner.name))[0]

    async def resnapshot(self, spec: TableSpec) -> None:
        await self.inner.resnapshot(spec)  # the capture publishes what it enqueues

    async def enqueue(self, table: str, keys: Sequence[Key]) -> None:
        await self.inner.enqueue(table, keys)

    async def head(self) -> int:
        return await self.bus.head(self.inner.name, self.partition)

    async def read_changes(self, after: int, limit: int) -> list[Change]:
        changes = await self.bus.read(self.inner.name, self.partition, after, limit)
        self._last = changes[-1].position if changes else max(self._last, after)
        return changes

    async def wait(self, timeout: float) -> None:
        try:
            await self.bus.wait(self.inner.name, self.partition, self._last, timeout)
        except RetryableError:  # the bus is away: the next read retries and says so
            await asyncio.sleep(timeout)

    async def fetch(self, table: str, key: str, keys: Sequence[Key]) -> dict[Key, dict[str, Any]]:
        return await self.inner.fetch(table, key, keys)

    def scan(
        self, table: str, key: str, *, page: int = 5000, after: Key | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        return self.inner.scan(table, key, page=page, after=after)

    async def related(
        self, owner: TableSpec, rel: Relation, keys: Sequence[Key]
    ) -> dict[Key, list[RelatedRecord]]:
        return await self.inner.related(owner, rel, keys)

    async def dependents(
        self, owner: TableSpec, rel: Relation, related_keys: Sequence[Key]
    ) -> list[Key]:
        return await self.inner.dependents(owner, rel, related_keys)

    def owns(self, key: Key) -> bool:
        return partition_of(key, self.bus.partitions) == self.partition

    async def forward(self, changes: Sequence[Change]) -> None:
        parts: dict[int, list[Change]] = {}
        for c in changes:
            parts.setdefault(partition_of(c.key, self.bus.partitions), []).append(c)
        await self.bus.forward(self.inner.name, parts)

    async def ack(self, position: int) -> None:
        await self.bus.trim(self.inner.name, self.partition, position)  # applied: ours only

    async def backlog(self, after: int) -> Backlog:
        depth = await self.bus.depth(self.inner.name, self.partition, after)
        return Backlog(changes=depth, oldest_committed_at=None)


async def _refuse_beside_run(engine: Engine) -> None:
    """A `vectorsync run` applying a source and workers applying it would interleave."""
    for lease in await _live(engine, "source:"):
        source = lease.name.removeprefix("source:")
        if source in engine.sources:
            raise ConfigError(
                f"source {source!r} is being synced by `vectorsync run` (pid {lease.pid} on "
                f"{lease.host}); stop it first: scale-out roles and `run` do not mix"
            )


async def _live(engine: Engine, prefix: str) -> list[Lease]:
    """The leases named ``prefix…`` whose holder lives (unexpired; on this host, its
    process still there)."""
    host, now = socket.gethostname(), time.time()
    return [
        lease
        for lease in await engine.state.leases()
        if lease.name.startswith(prefix)
        and lease.expires_at > now
        and (lease.host != host or pid_alive(lease.pid))
    ]


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


# -- capture -------------------------------------------------------------------------------
async def run_capture(engine: Engine, bus: Bus, stop: asyncio.Event, *, once: bool = False) -> None:
    """Publish every source's changes to the bus until ``stop`` is set; per source, as the
    holder of its capture lease or as a standby waiting for it. ``once``: what the source
    committed before the call, then return (another capture holding it is an error)."""
    await _refuse_beside_run(engine)
    runtimes = await _prepared(engine, stop)  # `vectorsync setup`: capture, snapshots
    tasks = [
        asyncio.create_task(_capture(engine, bus, name, runtimes, stop, once=once))
        for name in engine.sources
    ]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _hold(engine: Engine, lease: str, stop: asyncio.Event, *, standby: str) -> int | None:
    """Take the lease, waiting as a standby while another live process holds it."""
    said = False
    while not stop.is_set():
        try:
            return await engine.state.acquire_lease(lease, engine.instance_id, ttl=_ttl(engine))
        except LeaseHeld as exc:
            if not said:
                logger.info("%s: %s", standby, exc, extra={"action": "standby", "lease": lease})
                said = True
        await _wait(stop, _beat(engine))
    return None


async def _prepared(engine: Engine, stop: asyncio.Event) -> list[MappingRuntime]:
    """``engine.prepare()`` one process at a time (captures and workers start together:
    installing capture and registering a mapping's schema twice at once would race)."""
    token = await _hold(engine, "setup", stop, standby="waiting for another setup")
    if token is None:  # stopped while waiting
        raise asyncio.CancelledError
    try:
        return await engine.prepare()
    finally:
        with contextlib.suppress(Exception):
            await engine.state.release_lease("setup", engine.instance_id)


def _beat(engine: Engine) -> float:
    return engine.config.bus.heartbeat if engine.config.bus is not None else 1.0


def _ttl(engine: Engine) -> float:
    return _beat(engine) * 6


async def _renewing(engine: Engine, leases: dict[str, int], lost: asyncio.Event) -> None:
    """Renew the leases every beat; one taken over is dropped and ``lost`` set."""
    while True:
        await asyncio.sleep(_beat(engine))
        for name, token in list(leases.items()):
            try:
                await engine.state.renew_lease(name, engine.instance_id, token, ttl=_ttl(engine))
            except LeaseLost as exc:
                logger.warning("%s", exc, extra={"action": "lease_lost", "lease": name})
                leases.pop(name, None)
                lost.set()
            except Exception as exc:  # the next beat may get through
                logger.warning("renewing %s failed: %s", name, exc, extra={"action": "heartbeat"})


async def _capture(
    engine: Engine,
    bus: Bus,
    name: str,
    runtimes: Sequence[MappingRuntime],
    stop: asyncio.Event,
    *,
    once: bool,
) -> None:
    lease = f"capture:{name}"
    if once:
        token: int | None = await engine.state.acquire_lease(
            lease, engine.instance_id, ttl=_ttl(engine)
        )
    else:
        token = await _hold(engine, lease, stop, standby=f"capture of {name!r} on standby")
    if token is None:
        return
    logger.info("capturing %s", name, extra={"action": "capture_start", "source": name})
    leases, lost = {lease: token}, asyncio.Event()
    beat = asyncio.create_task(_renewing(engine, leases, lost))
    source = engine.sources[name]
    by_table: dict[str, list[MappingRuntime]] = {}
    for r in runtimes:
        if r.config.source == name:
            by_table.setdefault(r.config.table, []).append(r)
    partitions = bus.partitions
    batch = engine.config.sync.batch_size
    poll = getattr(engine.config.sources.get(name), "poll_interval", 0.2)
    try:

        def retried(what: str, call: Callable[[], Awaitable[T]]) -> Awaitable[T]:
            return retrying(f"{name}: {what}", call, engine.backoff, stop)

        epoch = await retried("read the capture epoch", source.epoch)
        published, position = await retried("read the bus", partial(bus.captured, name))
        if published != epoch:  # capture installed anew: its feed from the start
            position = 0
            await retried("publish to the bus", partial(bus.publish, name, epoch, 0, {}))
        target = await retried("read the source's head", source.head) if once else None
        while not stop.is_set() and not lost.is_set():
            if target is not None and position >= target:
                return  # once: everything committed before the call is on the bus
            read = partial(source.read_changes, position, batch)
            changes = await retried("read changes", read)
            if target is not None:
                changes = [c for c in changes if c.position <= target]
            if not changes:
                await source.wait(poll)
                now = await retried("read the capture epoch", source.epoch)
                if now != epoch:
                    epoch, position = now, 0
                continue
            parts: dict[int, list[Change]] = {}
            for c in changes:
                for one in await _expanded(engine, c, by_table.get(c.table, [])):
                    parts.setdefault(partition_of(one.key, partitions), []).append(one)
            last = changes[-1].position
            if lost.is_set():
                break
            await retried("publish to the bus", partial(bus.publish, name, epoch, last, parts))
            _failpoints.hit("capture_after_publish")
            # durable in the bus: the source may release it
            await retried("acknowledge the source", partial(source.ack, last))
            position = last
    finally:
        beat.cancel()
        await asyncio.gather(beat, return_exceptions=True)
        with contextlib.suppress(Exception):
            await engine.state.release_lease(lease, engine.instance_id)


async def _expanded(
    engine: Engine, change: Change, mappings: Sequence[MappingRuntime]
) -> list[Change]:
    """A TRUNCATE as a re-check of every key its table's mappings hold (each key to its
    own partition); any other change as it is."""
    if change.op != "truncate":
        return [change]
    keys: dict[Key, None] = {}
    for m in mappings:
        for skey in await engine.state.keys(m.name):
            keys[m.native_key(skey)] = None
    return [
        Change(
            table=change.table,
            key=k,
            op="delete",
            position=change.position,
            committed_at=change.committed_at,
        )
        for k in keys
    ]


# -- workers -------------------------------------------------------------------------------
@dataclass(slots=True)
class _Held:
    token: int
    stop: asyncio.Event
    task: asyncio.Task[None]
    worker: SourceWorker


async def _alive_workers(engine: Engine) -> list[str]:
    return sorted(lease.name.removeprefix("worker:") for lease in await _live(engine, "worker:"))


async def run_workers(
    engine: Engine, bus: Bus, stop: asyncio.Event, *, once: bool = False
) -> dict[str, int]:
    """Apply the partitions this worker holds until ``stop`` is set, rebalancing as workers
    come and go; the counts of what it applied. ``once``: every partition, up to what the
    bus holds at the call, then return (another worker running is an error)."""
    await _refuse_beside_run(engine)
    runtimes = await _prepared(engine, stop)
    await engine.recover()
    if once:
        return await _work_once(engine, bus, runtimes, stop)
    for embedder in engine.embedders.values():  # weights loaded before taking any partition
        if isinstance(embedder, Loadable):
            await embedder.load()
    me = f"worker:{engine.instance_id}"
    sqlite = engine.state.url.startswith("sqlite")
    if sqlite and [w for w in await _alive_workers(engine) if w != engine.instance_id]:
        raise ConfigError(
            "another vectorsync worker is running on this SQLite state store: several "
            "workers need a shared state store; set [state] url = "
            '"postgresql://…" (every worker and the capture on the same one)'
        )
    leases = {me: await engine.state.acquire_lease(me, engine.instance_id, ttl=_ttl(engine))}
    lost = asyncio.Event()
    beat = asyncio.create_task(_renewing(engine, leases, lost))
    held: dict[tuple[str, int], _Held] = {}
    slots = [(name, p) for name in engine.sources for p in range(bus.partitions)]
    totals: dict[str, int] = {}
    try:
        while not stop.is_set():
            if me not in leases:
                raise LeaseLost(f"worker {engine.instance_id}: its lease was taken over")
            for slot, h in list(held.items()):  # a partition lost, or its pipeline ended
                name = _partition_lease(*slot)
                if name not in leases or h.task.done():
                    await _drop(engine, held, slot, leases, totals)
            alive = await _alive_workers(engine)
            fair = math.ceil(len(slots) / max(1, len(alive)))
            for slot in sorted(held, reverse=True)[: max(0, len(held) - fair)]:
                await _drop(engine, held, slot, leases, totals)  # to make room for a newcomer
            rank = alive.index(engine.instance_id) if engine.instance_id in alive else 0
            order = slots[rank * fair :] + slots[: rank * fair]  # each starts elsewhere
            published = {name for name in engine.sources if await _published(bus, name)}
            for slot in order:
                if len(held) >= fair:
                    break
                if slot in held or slot[0] not in published:
                    continue  # held, or no capture has published that source yet
                name = _partition_lease(*slot)
                try:
                    token = await engine.state.acquire_lease(
                        name, engine.instance_id, ttl=_ttl(engine)
                    )
                except LeaseHeld:
                    continue
                leases[name] = token
                held[slot] = _start(engine, bus, runtimes, slot, token)
                logger.info(
                    "worker %s took partition %d of %s",
                    engine.instance_id,
                    slot[1],
                    slot[0],
                    extra={"action": "partition_taken", "source": slot[0], "partition": slot[1]},
                )
            await _wait(stop, _beat(engine))
    finally:
        for slot in list(held):
            await _drop(engine, held, slot, leases, totals)
        beat.cancel()
        await asyncio.gather(beat, return_exceptions=True)
        with contextlib.suppress(Exception):
            await engine.state.release_lease(me, engine.instance_id)
    return totals


async def _work_once(
    engine: Engine, bus: Bus, runtimes: Sequence[MappingRuntime], stop: asyncio.Event
) -> dict[str, int]:
    leases: dict[str, int] = {}
    totals: dict[str, int] = {}
    try:
        slots = []
        for name in engine.sources:
            if not await _published(bus, name):
                continue  # nothing captured yet: nothing to apply
            for p in range(bus.partitions):
                lease = _partition_lease(name, p)
                leases[lease] = await engine.state.acquire_lease(
                    lease, engine.instance_id, ttl=_ttl(engine)
                )
                slots.append((name, p))
        # rounds until no partition has entries left: a round's fan-out may hand keys to
        # partitions that already finished it
        while slots and not stop.is_set():
            workers = [
                _worker(engine, bus, runtimes, s, leases[_partition_lease(*s)]) for s in slots
            ]
            await asyncio.gather(*(w.run(once=True, stop=stop) for w in workers))
            for w in workers:
                _add(totals, w.totals)
            slots = [s for s in slots if await _behind(engine, bus, *s)]
    finally:
        for lease in leases:
            with contextlib.suppress(Exception):
                await engine.state.release_lease(lease, engine.instance_id)
    return totals


async def _behind(engine: Engine, bus: Bus, source: str, partition: int) -> bool:
    epoch, _ = await bus.captured(source)
    done = await engine.state.position(f"{source}#{partition}", epoch)
    return await bus.head(source, partition) > done


def _add(totals: dict[str, int], more: dict[str, int]) -> None:
    for k, n in more.items():
        totals[k] = totals.get(k, 0) + n


async def _published(bus: Bus, source: str) -> bool:
    """Whether a capture has published this source (False while the bus is away)."""
    try:
        return bool((await bus.captured(source))[0])
    except RetryableError as exc:
        logger.warning("%s", exc, extra={"action": "bus_unavailable", "source": source})
        return False


def _partition_lease(source: str, partition: int) -> str:
    return f"partition:{source}:{partition}"


def _start(
    engine: Engine,
    bus: Bus,
    runtimes: Sequence[MappingRuntime],
    slot: tuple[str, int],
    token: int,
) -> _Held:
    worker = _worker(engine, bus, runtimes, slot, token)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(once=False, stop=stop))
    return _Held(token=token, stop=stop, task=task, worker=worker)


def _worker(
    engine: Engine,
    bus: Bus,
    runtimes: Sequence[MappingRuntime],
    slot: tuple[str, int],
    token: int,
) -> SourceWorker:
    name, partition = slot
    source = PartitionSource(engine.sources[name], bus, partition)
    cfg = engine.config
    return SourceWorker(
        source,
        [r for r in runtimes if r.config.source == name],
        engine.state,
        batch_size=cfg.sync.batch_size,
        max_in_flight=cfg.sync.max_in_flight,
        poll_interval=getattr(cfg.sources.get(name), "poll_interval", 0.2),
        embedding_cache=cfg.state.embedding_cache,
        backoff=engine.backoff,
        lease=(_partition_lease(*slot), engine.instance_id, token),
        outage_after=cfg.sync.sink_outage_after,
        router=source,  # fanned-out keys of other partitions go to them
    )


async def _drop(
    engine: Engine,
    held: dict[tuple[str, int], _Held],
    slot: tuple[str, int],
    leases: dict[str, int],
    totals: dict[str, int],
) -> None:
    """Stop a partition's pipeline (it finishes what it began) and let its lease go."""
    h = held.pop(slot)
    h.stop.set()
    results = await asyncio.gather(h.task, return_exceptions=True)
    _add(totals, h.worker.totals)
    name = _partition_lease(*slot)
    if name in leases:
        leases.pop(name)
        with contextlib.suppress(Exception):
            await engine.state.release_lease(name, engine.instance_id)
    if isinstance(results[0], BaseException) and not isinstance(
        results[0], asyncio.CancelledError | LeaseLost
    ):
        logger.error(
            "partition %d of %s stopped: %s",
            slot[1],
            slot[0],
            results[0],
            extra={"action": "partition_failed", "source": slot[0], "partition": slot[1]},
        )


# -- status --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class ScaleOutStatus:
    capture: dict[str, str | None]  # source → holder (None: no capture running)
    workers: list[str]
    partitions: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "capture": self.capture,
            "workers": self.workers,
            "partitions": {
                s: {str(p): v for p, v in parts.items()} for s, parts in self.partitions.items()
            },
        }


async def status(engine: Engine, bus: Bus) -> ScaleOutStatus:
    """Who captures, which workers live, and per partition its holder, lag and depth."""
    now = time.time()
    live = {lease.name: lease for lease in await engine.state.leases() if lease.expires_at > now}
    capture = {
        name: (live[f"capture:{name}"].holder if f"capture:{name}" in live else None)
        for name in engine.sources
    }
    parts: dict[str, dict[int, dict[str, Any]]] = {}
    for name in engine.sources:
        epoch, _ = await bus.captured(name)
        for p in range(bus.partitions):
            lease = live.get(_partition_lease(name, p))
            done = await engine.state.position(f"{name}#{p}", epoch) if epoch else 0
            parts.setdefault(name, {})[p] = {
                "worker": lease.holder if lease else None,
                "depth": await bus.depth(name, p, done),
                "behind": await bus.head(name, p) > done,
            }
    return ScaleOutStatus(capture=capture, workers=await _alive_workers(engine), partitions=parts)
