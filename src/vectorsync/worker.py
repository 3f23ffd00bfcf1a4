"""The sync worker: one pipeline per source.

Three stages overlap, joined by bounded queues:

* **prepare** reads a batch of changes, coalesces them per key (latest position wins),
  re-reads the current rows of those keys in one query, renders text and payload and
  compares hashes with record state — deciding per key: embed+upsert, payload-only,
  delete, skip, or dead-letter;
* **embed** computes vectors for the texts whose content hash changed (cache first);
* **write** sends acknowledged writes to the sinks, then commits record state and the new
  position in one state transaction, then lets the source release the changes.

A crash anywhere replays at most the batches whose state was not committed; every write
is idempotent (deterministic point ids, upserts), so replay converges.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol

from . import _failpoints
from ._tasks import gather_or_fail
from .backoff import Backoff, retrying
from .chunking import Chunker, chunk_point_id
from .config import MappingConfig
from .conflicts import (
    FOREIGN,
    KEPT_VECTOR,
    Conflict,
    Kept,
    Resolver,
    VectorResolution,
    apply_kept,
    combined,
    vector_parts,
)
from .embed.base import Embedder, Metered
from .embed.named import NamedVectors
from .errors import (
    PermanentError,
    RecordError,
    RetryableError,
    VectorsyncError,
    classify,
    describe,
)
from .index.backfill import Backfill
from .metrics import SourceStats
from .model import (
    MAX_KEY_CHARS,
    Change,
    ChunkRef,
    Key,
    PayloadUpdate,
    Point,
    RecordState,
    SinkRecord,
    content_hash,
    key_text,
    payload_hash,
    point_id,
    row_digest,
)
from .outages import Outages, isolated
from .related import Relation
from .render import Renderer
from .sinks.base import Sink
from .sources.base import Source, TableSpec, WritesBack
from .state.runs import ErrorEntry
from .state.store import BatchCommit, DeadLetter, StateStore

__all__ = ["BatchReport", "MappingRuntime", "SourceWorker"]

logger = logging.getLogger(__name__)

_WRITE_CHUNK = 512
_SET_UP_SECONDS = 30.0  # for a sink that was down at start to open and make its collections
_DETAIL_CHARS = 2000


@dataclass(frozen=True, slots=True, kw_only=True)
class MappingRuntime:
    """A mapping with its adapters resolved (built by the engine)."""

    config: MappingConfig
    renderer: Renderer
    embedder: Embedder
    sink: Sink
    schema_version: str
    digest_columns: tuple[str, ...] = ()  # the row columns the mapping reads (row_digest)
    int_key: bool = False  # keys are integers (record state keeps them as text)
    relations: tuple[Relation, ...] = ()
    # completes re-read rows for rendering (related fields, absent graph properties)
    resolve: Callable[[dict[Key, dict[str, Any]]], Awaitable[None]] | None = None
    state_name: str = ""  # see name
    collection_name: str = ""  # see collection
    version: int = 0  # the index version this target writes (0: not versioned)
    chunker: Chunker | None = None  # each record's text cut into chunks, a point each
    # a copy whose sink was down at start: its real targets, built when the sink is back
    pending: Callable[[], Awaitable[Sequence[MappingRuntime]]] | None = None

    @property
    def name(self) -> str:
        """Where this target's record state lives: the mapping's name for its live index
        version, ``mapping@vN`` for a version being built or kept (point ids are always
        the mapping's: the same record has the same id in every version)."""
        return self.state_name or self.config.name

    @property
    def spec(self) -> TableSpec:
        return TableSpec(table=self.config.table, key=self.config.key)

    def native_key(self, key: str) -> Key:
        return int(key) if self.int_key else key

    def key_problem(self, key: Any) -> str | None:
        """Why ``key`` cannot identify a record (None when it can): keys are integers
        (64-bit) or text, the type the key column declares, and never NULL."""
        if type(key) is int:  # the common case first: checked twice per record
            if -(2**63) <= key < 2**63:
                return None
        elif type(key) is str and not self.int_key and len(key) <= MAX_KEY_CHARS:
            return None
        column = self.config.key
        if key is None:
            return f"the row's key {column!r} is NULL; give every row a key"
        if isinstance(key, bool) or not isinstance(key, int | str):
            return (
                f"key {_shown(key)} is a {type(key).__name__}: keys must be integers or text; "
                f"store {column!r} as one of those"
            )
        if self.int_key and not isinstance(key, int):
            return f"key {_shown(key)} is text in the integer key column {column!r}"
        if isinstance(key, int) and not -(2**63) <= key < 2**63:
            return f"key {key} of {column!r} is outside the 64-bit integer range"
        if isinstance(key, str) and len(key) > MAX_KEY_CHARS:
            return f"key of {column!r} has {len(key)} characters, over {MAX_KEY_CHARS}"
        return None

    @property
    def collection(self) -> str:
        """The physical collection this target writes."""
        return self.collection_name or self.config.collection_name


@dataclass(slots=True, kw_only=True)
class _Upsert:
    """One point to write in full: a record's, or one chunk of a chunked record."""

    key: Key
    state: RecordState  # the record's new state (shared by its chunks)
    id: str
    text_hash: str
    payload: dict[str, Any]
    text: str
    vector: list[float] | None = None
    fresh: bool = True  # a point the record did not have (deleted if the record is refused)
    extra: dict[str, list[float]] = field(default_factory=dict)  # keep_both's foreign vector


@dataclass(frozen=True, slots=True, kw_only=True)
class _Seen:
    """What a batch read to resolve conflicts, and the text hash a record has now."""

    held: Mapping[str, SinkRecord]  # point id → the point as it is
    kept: Mapping[str, Kept]  # key → sink values kept earlier
    bases: Mapping[str, list[float]]  # text hash → the vector last written
    text_hash: str
    unsettled: set[str]  # keys an uncommitted batch planned


@dataclass(slots=True, kw_only=True)
class _MappingWork:
    mapping: MappingRuntime
    upserts: list[_Upsert] = field(default_factory=list)
    payload_only: list[tuple[RecordState, PayloadUpdate]] = field(default_factory=list)
    deletes: list[tuple[str, str]] = field(default_factory=list)  # (key, point id)
    drops: list[tuple[str, str]] = field(default_factory=list)  # chunks gone: (key, point id)
    state_only: list[RecordState] = field(default_factory=list)  # no sink write needed
    failed: list[DeadLetter] = field(default_factory=list)
    done: list[str] = field(default_factory=list)  # keys now consistent (resolve their DLQ)
    keys: list[str] = field(default_factory=list)  # every key planned (a deferral's backlog)
    deferred: bool = False  # its sink is down: not written, its keys go to the backlog
    processed: int = 0
    inserted: int = 0
    text_changed: int = 0  # records written in full (new or with a new text)
    chunks: int = 0  # chunks of those records (chunked mappings)
    skipped: int = 0
    embedded: int = 0
    cache_hits: int = 0
    bytes: int = 0
    truncated: int = 0  # texts cut to max_text_length
    tokens: int = 0  # billed by an API embedder (embed.base.Metered)
    conflicts: list[Conflict] = field(default_factory=list)  # resolved by the mapping's policy
    kept: dict[str, Kept | None] = field(default_factory=dict)  # key → kept sink values now
    write_back: list[tuple[Key, dict[str, Any]]] = field(default_factory=list)  # to the source


async def _first(*awaitables: Awaitable[Any]) -> None:
    """Until the first of ``awaitables`` is done; the others are cancelled."""
    waits = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


@dataclass(slots=True, kw_only=True)
class _Batch:
    position: int
    changes: int
    work: list[_MappingWork]
    committed_at: list[float] = field(default_factory=list)  # of each change, for latency
    planned: list[tuple[tuple[str, str], RecordState | None]] = field(default_factory=list)
    backfill: Backfill | None = None  # a page of a backfill (no change of the feed)
    checkpoints: list[tuple[str, int, Key | None, int, bool]] = field(default_factory=list)
    emitted: float = 0.0  # monotonic time the batch was planned
    probe: str | None = None  # a page of this target's backlog (see outages)
    caught: list[str] = field(default_factory=list)  # the backlog keys a probe re-reads


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchReport:
    """What one committed batch did; handed to the progress callback."""

    source: str
    position: int
    target: int | None
    changes: int
    counts: dict[str, int]
    mappings: dict[str, dict[str, int]] = field(default_factory=dict)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    backfill: dict[str, Any] | None = None  # mapping, version, done, total, rate, eta


_DONE = object()


class Router(Protocol):
    """Where a key belongs when several workers share a source (scale-out's partitions)."""

    def owns(self, key: Key) -> bool: ...

    async def forward(self, changes: Sequence[Change]) -> None:
        """Hand changes of keys this worker does not own to the workers that do."""
        ...


class SourceWorker:
    def __init__(
        self,
        source: Source,
        mappings: Sequence[MappingRuntime],
        state: StateStore,
        *,
        batch_size: int = 1000,
        max_in_flight: int = 2,
        poll_interval: float = 0.2,
        embedding_cache: bool = True,
        backoff: Backoff | None = None,
        on_batch: Callable[[BatchReport], None] | None = None,
        on_changes: Callable[[Sequence[Change]], None] | None = None,
        run_id: int | None = None,
        stats: SourceStats | None = None,
        lease: tuple[str, str, int] | None = None,
        backfills: Callable[[], Sequence[Backfill]] | None = None,
        on_backfilled: Callable[[Backfill], Awaitable[Sequence[MappingRuntime] | None]]
        | None = None,
        expiring: Callable[[], bool] | None = None,
        on_expired: Callable[[], Awaitable[Sequence[MappingRuntime]]] | None = None,
        outage_after: float = 5.0,
        router: Router | None = None,
    ) -> None:
        self.source = source
        self._router = router  # scale-out: fanned-out keys of other partitions go there
        self._outages = Outages(outage_after)
        self.run_id = run_id
        self.lease = lease  # (name, holder, token): fences every batch commit
        self.state = state
        self._by_table: dict[str, list[MappingRuntime]] = {}
        # related table → the (mapping, relation) pairs built from its records (fan-out)
        self._watch: dict[str, list[tuple[MappingRuntime, Relation]]] = {}
        self._use(mappings)
        self._backfills_of = backfills or list
        self._backfills = list(self._backfills_of())
        self._on_backfilled = on_backfilled
        self._backfilled: Backfill | None = None  # its last page planned: verify and swap
        self._page_committed = asyncio.Event()  # replaced (the old one set) at each page
        self._taken = asyncio.Event()  # replaced (the old one set) when a stage takes a batch
        # a target's time is up (a previous index version kept long enough): drain, then
        # the engine drops it and hands back the targets to go on with
        self._expiring = expiring or (lambda: False)
        self._on_expired = on_expired
        self._expire = False
        self._batch_size = batch_size
        self._max_in_flight = max_in_flight
        self._poll = poll_interval
        self._use_cache = embedding_cache
        self._backoff = backoff or Backoff()
        self._on_batch = on_batch
        self._on_changes = on_changes
        # Planned-but-uncommitted record state, so a key in two in-flight batches is compared
        # with what the earlier one will have written (not with stale committed state).
        self._overlay: dict[tuple[str, str], RecordState | None] = {}
        self._inflight_vectors: dict[str, list[float]] = {}
        self._inflight_foreign: dict[str, list[float]] = {}  # point id → keep_both's, unsettled
        self._pending_dlq: dict[str, set[str]] = {}
        self.totals: dict[str, int] = {}
        self.stats = stats or SourceStats()
        self._queues: list[asyncio.Queue[Any]] = []
        self._stop = asyncio.Event()
        self._epoch = ""
        self._epoch_changed = False
        self._truncation_logged: set[str] = set()
        self._once = False

    def _use(self, mappings: Sequence[MappingRuntime]) -> None:
        self._by_table.clear()
        self._watch.clear()
        for m in mappings:
            self._by_table.setdefault(m.config.table, []).append(m)
            for rel in m.relations:
                self._watch.setdefault(rel.table, []).append((m, rel))
                if rel.edge is not None:  # an edge's change: its key is "<edge>:<id>"
                    self._watch.setdefault(rel.edge, []).append((m, rel))
        # the targets of a mapping with several sinks: one sink that is down holds no other back
        copies = isolated(m.config for m in mappings)
        self._outages.isolated = {m.name for m in mappings if m.config.name in copies}
        # conflict policies that read the points before writing (source_wins reads nothing)
        self._resolvers = {
            m.name: Resolver(m.config) for m in mappings if m.config.conflicts != "source_wins"
        }

    # -- the pipeline -------------------------------------------------------------------
    async def run(self, *, once: bool, stop: asyncio.Event) -> None:
        """Sync until ``stop`` is set; with ``once``, until everything committed before the
        call is applied. When the source's capture is re-installed meanwhile (a new
        epoch: its positions restarted), the pipeline drains and starts over on the new
        feed from its beginning."""
        for mappings in self._by_table.values():
            for m in mappings:
                letters = await self.state.dead_letters(m.name, status="pending")
                self._pending_dlq[m.name] = {d.key for d in letters}
        self._stop = stop
        self._once = once
        backlog = await self.state.backlog_counts()
        self._outages.behind = {t for t in self._outages.isolated if backlog.get(t)}
        for m in self._targets():
            if m.pending is not None:  # down from the start
                self._outages.failed(m.name)
        redone = await self.state.redo_inflight(self.source.name)
        _failpoints.hit("after_redo_inflight")
        if redone:
            logger.warning(
                "%d records were written to sinks by a run that died before recording them; "
                "they are rewritten",
                redone,
                extra={"action": "redo_inflight", "source": self.source.name, "count": redone},
            )
        while True:
            self._epoch = await self._current_epoch()
            self._epoch_changed = False
            await self._pipeline(once=once, stop=stop)
            if self._backfilled is not None and not stop.is_set():
                await self._finish_backfill(self._backfilled)
                continue
            if self._expire and not stop.is_set():
                self._expire = False
                if self._on_expired is not None:
                    self._use(await self._on_expired())
                continue
            if not self._epoch_changed or stop.is_set():
                return
            logger.warning(
                "source %s: change capture was installed anew while syncing; following the "
                "new change feed from its start",
                self.source.name,
                extra={"action": "new_epoch", "source": self.source.name},
            )

    async def _finish_backfill(self, done: Backfill) -> None:
        """Every page of a backfill is committed and nothing is in flight: the engine
        verifies the version and swaps it live; the pipeline goes on with the targets it
        hands back."""
        self._backfilled = None
        self._backfills.remove(done)
        if self._on_backfilled is None:
            return
        targets = await self._on_backfilled(done)
        if targets is not None:
            self._use(targets)
        self._backfills = list(self._backfills_of())  # one that did not verify runs again

    async def _current_epoch(self) -> str:
        epoch = await self._retry("read the capture epoch", self.source.epoch, self._stop)
        if not epoch:
            raise PermanentError(
                f"source {self.source.name!r}: no change capture is installed (was it removed "
                "with `vectorsync teardown`?); run `vectorsync setup`, then start again"
            )
        return str(epoch)

    async def _pipeline(self, *, once: bool, stop: asyncio.Event) -> None:
        cursor = await self.state.position(self.source.name, self._epoch)
        target = await self.source.head() if once else None
        embed_q: asyncio.Queue[Any] = asyncio.Queue(self._max_in_flight)
        write_q: asyncio.Queue[Any] = asyncio.Queue(self._max_in_flight)
        self._queues = [embed_q, write_q]
        stages = [
            self._prepare_stage(cursor, target, stop, embed_q),
            self._embed_stage(embed_q, write_q),
            self._write_stage(write_q, target, stop),
        ]
        tasks = [asyncio.create_task(s) for s in stages]
        try:
            await gather_or_fail(tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _prepare_stage(
        self, cursor: int, target: int | None, stop: asyncio.Event, out: asyncio.Queue[Any]
    ) -> None:
        outages = self._outages
        while not stop.is_set() and (
            target is None or cursor < target or self._backfills or outages.pending(once=True)
        ):
            if self._on_expired is not None and self._expiring():
                self._expire = True
                break  # drain, then drop it (see run)
            changes: list[Change] = []
            if target is None or cursor < target:
                changes = await self._retry(
                    "read changes",
                    partial(self.source.read_changes, cursor, self._batch_size),
                    stop,
                )
                if target is not None:
                    changes = [c for c in changes if c.position <= target]
            if changes:
                _failpoints.hit("after_read_changes")
                cursor = changes[-1].position
                await out.put(await self._prepare(changes))
                if len(changes) < self._batch_size:
                    await self._until_taken(stop)
            probed = await self._probe(cursor, out)
            if self._backfills:  # a page after every batch of live changes, or when idle
                bf = self._backfills[0]
                if not bf.room():  # its budget is in flight: wait for a page's commit
                    if not changes:
                        await self._idle(stop, self._page_committed.wait())
                    continue
                page = await self._backfill_page(bf, cursor)
                if page is not None:
                    await out.put(page)
                if self._backfilled is not None:
                    break  # drain, then verify and swap (see run)
                continue
            if changes or probed:
                continue
            if target is not None and cursor >= target and not outages.pending(once=True):
                await out.put(_Batch(position=target, changes=0, work=[]))  # finish there
                break
            await self._idle(stop)
            if await self._current_epoch() != self._epoch:
                self._epoch_changed = True
                break
        await out.put(_DONE)

    async def _backfill_page(self, bf: Backfill, cursor: int) -> _Batch | None:
        """The next page of keys for ``bf``'s target, planned for that target alone (its
        rows re-read as any change's); the last one marks the backfill done."""
        m = bf.target
        keys: list[Key] = []
        scan = self.source.scan(m.config.table, m.config.key, page=bf.page, after=bf.after)
        async with contextlib.aclosing(scan) as rows:  # type: ignore[type-var]
            async for row in rows:
                keys.append(row[m.config.key])
                if len(keys) >= bf.page:
                    break
        bf.planned(len(keys))
        if not keys:
            bf.finished = True
            self._backfilled = bf
            return _Batch(
                position=cursor,
                changes=0,
                work=[],
                backfill=bf,
                checkpoints=[(bf.mapping, bf.version, bf.after, 0, True)],
                emitted=time.monotonic(),
            )
        changes = [
            Change(table=m.config.table, key=k, op="snapshot", position=cursor) for k in keys
        ]
        batch = await self._prepare(changes, only=m)
        batch.changes = 0  # no change of the feed was read
        batch.backfill = bf
        batch.checkpoints.append((bf.mapping, bf.version, keys[-1], len(keys), False))
        batch.emitted = time.monotonic()
        bf.after = keys[-1]
        return batch

    def _targets(self) -> list[MappingRuntime]:
        return list({id(m): m for ms in self._by_table.values() for m in ms}.values())

    async def _probe(self, cursor: int, out: asyncio.Queue[Any]) -> bool:
        """Plan a page of backlog for each target whose turn it is (see outages): its keys
        re-read as snapshot changes, for that target alone. True if one was planned."""
        planned = False
        if not self._outages.behind:  # the common case: no sink left anything behind
            return planned
        for m in self._targets():
            if m.name not in self._outages.isolated:
                continue
            if not self._outages.probe_due(m.name, once=self._once):
                continue
            if m.pending is not None:  # its sink was down at start: set it up first
                ready = await self._set_up(m)
                if ready is None:
                    continue
                m = ready
            keys = await self._retry(
                "read the sink backlog",
                partial(self.state.backlog, m.name, self._batch_size),
                self._stop,
            )
            if not keys:
                self._outages.behind.discard(m.name)
                continue
            table = m.config.table
            changes = [
                Change(table=table, key=m.native_key(k), op="snapshot", position=cursor)
                for k in keys
            ]
            batch = await self._prepare(changes, only=m)
            batch.changes = 0  # no change of the feed was read
            batch.probe, batch.caught = m.name, keys
            self._outages.probing.add(m.name)
            await out.put(batch)
            planned = True
        return planned

    async def _set_up(self, m: MappingRuntime) -> MappingRuntime | None:
        """Open a placeholder's sink and build its targets (they replace it); None while
        the sink is still down."""
        assert m.pending is not None
        try:  # bounded: setting up retries its calls for minutes, the other sinks wait
            targets = await asyncio.wait_for(m.pending(), timeout=_SET_UP_SECONDS)
        except (RetryableError, TimeoutError):
            self._outages.failed(m.name)
            if self._once:
                self._outages.given_up.add(m.name)
            return None
        self._use([*(t for t in self._targets() if t is not m), *targets])
        self._outages.recovered(m.name)  # opened and set up: live batches write it again
        logger.warning(
            "sink %s of mapping %s is reachable: catching up its backlog",
            m.config.sink,
            m.name,
            extra={"action": "sink_back", "mapping": m.name},
        )
        return next(t for t in targets if t.name == m.name)

    async def _until_taken(self, stop: asyncio.Event) -> None:
        """Until no batch waits between the stages. A reader that caught up with its source
        reads again only then, taking in one batch what came meanwhile: small batches
        queued behind each other would make every change wait for all the ones ahead
        (commit → written latency). Full batches (a backlog) keep the queues filled."""
        while any(q.qsize() for q in self._queues) and not stop.is_set():
            await _first(stop.wait(), self._taken.wait())

    def _took(self) -> None:
        woken, self._taken = self._taken, asyncio.Event()
        woken.set()

    async def _idle(self, stop: asyncio.Event, *also: Awaitable[Any]) -> None:
        """Wait for the source to signal new changes (or ``also``), at most one poll
        interval."""
        await _first(stop.wait(), self.source.wait(self._poll), *also)

    async def _embed_stage(self, inp: asyncio.Queue[Any], out: asyncio.Queue[Any]) -> None:
        while (batch := await inp.get()) is not _DONE:
            self._took()
            for work in batch.work:
                name = work.mapping.name
                if work.deferred or (self._outages.is_down(name) and batch.probe != name):
                    work.deferred = True  # to the backlog, embedded when it is caught up
                    continue
                await self._embed(work)
            _failpoints.hit("after_embed")
            await out.put(batch)
        await out.put(_DONE)

    async def _write_stage(
        self, inp: asyncio.Queue[Any], target: int | None, stop: asyncio.Event
    ) -> None:
        while (batch := await inp.get()) is not _DONE:
            self._took()
            written = list(
                dict.fromkeys(
                    (w.mapping.name, key)
                    for w in batch.work
                    for key in (
                        *(u.state.key for u in w.upserts),
                        *(st.key for st, _ in w.payload_only),
                        *(key for key, _ in w.deletes),
                        *(key for key, _ in w.drops),
                    )
                )
            )
            if written:  # durable before the first sink write (see StateStore.redo_inflight)
                journal = partial(
                    self.state.journal,
                    self.source.name,
                    batch.position,
                    written,
                    _chunk_points(batch.work),
                )
                await self._retry("journal batch", journal, stop)
                _failpoints.hit("after_journal")
            for work in batch.work:
                if work.mapping.name in self._outages.isolated:
                    await self._write_isolated(batch, work, stop)
                else:
                    await self._write(work, stop)
            _failpoints.hit("after_sink_write")
            commit = self._commit_for(batch)
            await self._retry("commit state", partial(self.state.commit, commit), stop)
            _failpoints.hit("after_state_commit")
            if batch.backfill is not None:
                paged = sum(c[3] for c in batch.checkpoints)
                batch.backfill.committed(paged, time.monotonic() - batch.emitted)
                woken, self._page_committed = self._page_committed, asyncio.Event()
                woken.set()
                batch.backfill.done += sum(w.processed for w in batch.work)
                batch.backfill.embedded += sum(w.embedded for w in batch.work)
            self._settle(batch)
            try:
                await self.source.ack(batch.position)
            except VectorsyncError as exc:  # harmless: the next ack covers it
                logger.warning("source ack failed: %s", exc, extra={"action": "source_ack"})
            _failpoints.hit("after_source_ack")
            self._report(batch, target)

    async def _retry(
        self,
        what: str,
        call: Callable[[], Awaitable[Any]],
        stop: asyncio.Event,
        backoff: Backoff | None = None,
    ) -> Any:
        """Retry transient failures; each incident is one error-log entry whose retry count
        follows the attempts and which is resolved when the call succeeds."""
        incident: list[int] = []

        async def on_retry(exc: RetryableError, attempt: int) -> None:
            error_type, code = classify(exc)
            with contextlib.suppress(VectorsyncError):  # the state store may be what is down
                if incident:
                    await self.state.update_error(
                        incident[0], retry_count=attempt, message=describe(exc)
                    )
                    return
                incident.append(
                    await self.state.log_error(
                        ErrorEntry(
                            error_type=error_type,
                            error_code=code,
                            message=describe(exc),
                            run_id=self.run_id,
                            source=self.source.name,
                            details={
                                "operation": what,
                                "messages": [
                                    {
                                        "at": time.time(),
                                        "attempt": attempt,
                                        "message": describe(exc),
                                    }
                                ],
                            },
                            stack_trace=_trace(exc),
                            retry_count=attempt,
                            max_retries=self._backoff.max_attempts,
                        )
                    )
                )

        async def on_recovered(attempts: int) -> None:
            if incident:
                with contextlib.suppress(VectorsyncError):
                    await self.state.update_error(
                        incident[0], retry_count=attempts, status="resolved"
                    )

        return await retrying(
            f"{self.source.name}: {what}",
            call,
            backoff or self._backoff,
            stop,
            on_retry=on_retry,
            on_recovered=on_recovered,
        )

    # -- prepare ------------------------------------------------------------------------
    async def _prepare(
        self, changes: Sequence[Change], *, only: MappingRuntime | None = None
    ) -> _Batch:
        """A batch planned for every target of the changed tables (or ``only`` one: a
        backfill page)."""
        if self._on_changes is not None and only is None:
            self._on_changes(changes)
        latest: dict[tuple[str, Key], Change] = {}
        for change in changes:
            if change.op == "truncate":
                latest.update(await self._truncated(change))
                continue
            latest[(change.table, change.key)] = change  # in position order: last wins
        by_table: dict[str, dict[Key, Change]] = {}
        for (table, key), change in latest.items():
            by_table.setdefault(table, {})[key] = change
        batch = _Batch(
            position=changes[-1].position,
            changes=len(changes),
            work=[],
            committed_at=[c.committed_at for c in changes],
        )
        if only is None:
            self.stats.captured += len(changes)
            await self._fan_out(by_table)
        for table, keyed in by_table.items():
            mappings = [only] if only is not None else self._by_table.get(table, [])
            if not mappings:
                continue
            invalid = {k: why for k in keyed if (why := mappings[0].key_problem(k)) is not None}
            bad = [(keyed.pop(k), why) for k, why in invalid.items()]
            rows: dict[Key, dict[str, Any]] = {}
            if keyed:
                rows = await self._retry(
                    f"re-read {table}",
                    partial(self.source.fetch, table, mappings[0].config.key, list(keyed)),
                    self._stop,
                )
            for m in mappings:
                flying = self._outages.in_flight
                if m.pending is not None:  # its sink was down at start: to the backlog
                    work = _MappingWork(mapping=m, deferred=True, processed=len(keyed))
                    work.keys = [str(k) for k in keyed]
                    batch.work.append(work)
                    flying[m.name] = flying.get(m.name, 0) + 1
                    continue
                own = rows
                if m.resolve is not None and rows:
                    own = {k: dict(row) for k, row in rows.items()}
                    await self._retry(
                        f"read related records of {table}", partial(m.resolve, own), self._stop
                    )
                work = _MappingWork(mapping=m)
                for change, why in bad:
                    error = RecordError(why, kind="invalid_key")
                    work.failed.append(_dead_letter(m.name, change.key, change, error, None))
                await self._plan(work, keyed, own, batch)
                batch.work.append(work)
                flying[m.name] = flying.get(m.name, 0) + 1
        return batch

    async def _fan_out(self, by_table: dict[str, dict[Key, Change]]) -> None:
        """A changed related record re-syncs the records built from it: those related to
        it now (the relation reversed at the source) and those last built from it (the
        state store and in-flight batches), which covers deleted records and edges. With
        a ``router`` (scale-out), keys of other partitions are handed to them instead."""
        elsewhere: list[Change] = []
        for table, keyed in list(by_table.items()):
            # a snapshot of a related table needs no fan-out: its dependents are
            # snapshotted too (a new relation changes the mapping's schema version)
            changed = {k: c for k, c in keyed.items() if c.op != "snapshot"}
            for m, rel in self._watch.get(table, []) if changed else []:
                found = await self._retry(
                    f"find records depending on {table}",
                    partial(self.source.dependents, m.spec, rel, list(changed)),
                    self._stop,
                )
                related = {str(k) for k in changed}
                stored = await self.state.dependents(m.name, rel.name, sorted(related))
                planned = [
                    st.payload.get("_vs_key", st.key)
                    for (name, _), st in self._overlay.items()
                    if name == m.name and st is not None and st.deps
                    if related.intersection(st.deps.get(rel.name, ()))
                ]
                last = max(changed.values(), key=lambda c: c.position)
                target = by_table.setdefault(m.config.table, {})
                for key in [*found, *stored, *planned]:
                    if key in target:
                        continue
                    change = Change(
                        table=m.config.table,
                        key=key,
                        op="update",
                        position=last.position,
                        committed_at=last.committed_at,
                    )
                    if self._router is None or self._router.owns(key):
                        target[key] = change
                    else:
                        elsewhere.append(change)
        if elsewhere and self._router is not None:  # applied by their partitions' workers
            await self._retry(
                "hand fanned-out keys to their partitions",
                partial(self._router.forward, elsewhere),
                self._stop,
            )

    async def _truncated(self, change: Change) -> dict[tuple[str, Key], Change]:
        """A TRUNCATE re-checks every key the table's mappings hold: the re-read finds them
        gone (or back, if re-inserted since) like any other change."""
        out: dict[tuple[str, Key], Change] = {}
        for m in self._by_table.get(change.table, []):
            for skey in await self.state.keys(m.name):
                key = m.native_key(skey)
                out[(change.table, key)] = Change(
                    table=change.table,
                    key=key,
                    op="delete",
                    position=change.position,
                    committed_at=change.committed_at,
                )
        return out

    async def _plan(
        self,
        work: _MappingWork,
        keyed: dict[Key, Change],
        rows: dict[Key, dict[str, Any]],
        batch: _Batch,
    ) -> None:
        m = work.mapping
        family, selects = m.config.family, m.config.row_filter  # read once, not per record
        work.keys = [str(k) for k in keyed]
        states = await self._states(m.name, work.keys)
        now = time.time()
        work.processed += len(keyed)
        resolver = self._resolvers.get(m.name)
        kept: dict[str, Kept] = {}
        held: dict[str, SinkRecord] = {}
        bases: dict[str, list[float]] = {}
        unsettled: set[str] = set()
        if resolver is not None:  # the points as they are now, to find others' edits
            kept = await self.state.kept(m.name, work.keys)
            ids = [st.point_id for st in states.values()]
            read = partial(m.sink.retrieve, m.collection, ids, with_vectors=True)
            held = {r.id: r for r in await self._retry(f"read {m.collection}", read, self._stop)}
            bases = await self._last_vectors(m, list(states.values()))
            # planned by a batch not committed yet: its point may not hold that write yet,
            # so what it holds is no evidence of someone else's edit (a later write or check is)
            unsettled = {k for k in work.keys if (m.name, k) in self._overlay}
        for key, change in keyed.items():
            skey = str(key)
            state = states.get(skey)
            row = rows.get(key)
            if row is not None and (why := m.key_problem(row[m.config.key])) is not None:
                # the row found is keyed by an equal value of another type (SQLite: 2.0 for
                # 2): it is not this record, so the record is gone and that row is refused
                error = RecordError(why, kind="invalid_key")
                work.failed.append(_dead_letter(m.name, row[m.config.key], change, error, None))
                row = None
            if row is not None and selects is not None and not selects(row):
                row = None  # another copy's record (embedder_by): gone from this one
            if row is None:
                # Delete even without state: a crash after a sink write but before the state
                # commit leaves a point that no state row knows of.
                work.deletes.append((skey, point_id(family, key)))
                if state is not None and state.chunks is not None:
                    work.drops.extend((skey, pid) for pid in state.point_ids)
                self._plan_state(batch, (m.name, skey), None)
                work.done.append(skey)
                if skey in kept:
                    work.kept[skey] = None
                continue
            try:
                rendered = m.renderer.render(row)
            except RecordError as exc:
                work.failed.append(_dead_letter(m.name, key, change, exc, row))
                continue
            if rendered.truncated:
                self._truncated_text(work, key)
            work.bytes += len(rendered.text.encode())
            text_hash = content_hash(m.embedder.model_id, rendered.text)
            # the row as re-read now is at least as new as the batch's last position: one
            # version for the whole batch lets payload updates that set the same values
            # go to the sink as one call (sinks.base.same_updates)
            version = max(batch.position, state.source_version if state else 0)
            fields, fields_hash = rendered.payload, rendered.payload_hash
            vec: VectorResolution | None = None
            if resolver is not None:
                seen = _Seen(
                    held=held, kept=kept, bases=bases, text_hash=text_hash, unsettled=unsettled
                )
                fields, vec = self._resolved(work, resolver, key, rendered.payload, state, seen)
                fields_hash = payload_hash(fields)
            payload = {
                **fields,
                "_vs_key": key,
                "_vs_text_hash": text_hash,
                "_vs_version": version,
                "_vs_schema": m.schema_version,
            }
            new = RecordState(
                mapping=m.name,
                key=skey,
                point_id=state.point_id if state and state.point_id else point_id(family, key),
                text_hash=text_hash,
                payload_hash=fields_hash,
                source_version=version,
                schema_version=m.schema_version,
                synced_at=now,
                payload=payload,
                row_digest=row_digest(row, m.digest_columns),
                deps={r.name: tuple(str(k) for k in row[r.deps_column]) for r in m.relations}
                if m.relations
                else None,
            )
            if m.chunker is not None:
                try:
                    chunked = self._plan_chunks(work, key, state, new, rendered.text)
                except RecordError as exc:  # a record whose chunking fails goes whole
                    work.failed.append(_dead_letter(m.name, key, change, exc, row))
                    continue
                work.done.append(skey)
                if chunked is not None:
                    self._plan_state(batch, (m.name, skey), chunked)
                continue
            work.done.append(skey)
            rec = held.get(new.point_id)
            # a vector conflict: keep the sink's (no vector written), or write the source's
            action = vec.action if vec is not None else None
            if state is None or (
                action != "keep" and (state.text_hash != text_hash or action is not None)
            ):
                work.inserted += state is None
                work.text_changed += state is None or state.text_hash != text_hash
                foreign = vec.foreign if vec is not None else None
                if foreign is None:  # keep_both: a kept foreign vector stays
                    foreign = self._inflight_foreign.get(new.point_id)
                if foreign is None and rec is not None:
                    foreign = rec.extra.get(FOREIGN)
                if foreign is not None:
                    self._inflight_foreign[new.point_id] = foreign
                work.upserts.append(
                    _Upsert(
                        key=key,
                        state=new,
                        id=new.point_id,
                        text_hash=text_hash,
                        payload=payload,
                        text=rendered.text,
                        extra={FOREIGN: foreign} if foreign is not None else {},
                    )
                )
            elif state.text_hash != text_hash or (state.payload_hash, state.schema_version) != (
                new.payload_hash,
                new.schema_version,
            ):
                if rec is not None:  # to what the point holds
                    update = _payload_update(new.point_id, _ours(rec.payload, payload), payload)
                    if not update.set and not update.unset:
                        work.state_only.append(new)
                        self._plan_state(batch, (m.name, skey), new)
                        continue
                else:
                    update = _payload_update(new.point_id, state.payload, payload)
                work.payload_only.append((new, update))
            else:
                work.skipped += 1
                if state.row_digest == new.row_digest:
                    continue
                work.state_only.append(new)  # same point; remember the row as it is now
            self._plan_state(batch, (m.name, skey), new)

    def _plan_chunks(
        self,
        work: _MappingWork,
        key: Key,
        state: RecordState | None,
        new: RecordState,
        text: str,
    ) -> RecordState | None:
        """Plan a chunked record: the chunks whose text is new are embedded and written,
        those that only moved get their position fields, those gone are deleted; an
        unchanged text is not cut again (a payload change updates every chunk). Returns
        the record's new state, None when nothing changed."""
        m = work.mapping
        assert m.chunker is not None
        store_text = m.chunker.config.store_text
        if state is not None and state.chunks is not None and state.text_hash == new.text_hash:
            refs = state.chunks
            st = replace(new, chunks=refs)
            if (state.payload_hash, state.schema_version) == (new.payload_hash, new.schema_version):
                work.skipped += 1
                if state.row_digest == new.row_digest:
                    return None
            else:
                for i, ref in enumerate(refs):
                    before = _chunk_payload(state.payload, text, refs, i, store_text)
                    after = _chunk_payload(new.payload, text, refs, i, store_text)
                    work.payload_only.append((st, _payload_update(ref[0], before, after)))
            work.state_only.append(st)
            return st
        chunks = m.chunker.split(text)
        model, family = m.embedder.model_id, m.config.family
        refs = tuple(
            (chunk_point_id(family, key, c), content_hash(model, c.text), c.start, c.end)
            for c in chunks
        )
        st = replace(new, chunks=refs)
        old = list(state.chunks or ()) if state is not None else []
        had = {ref[0]: (i, ref) for i, ref in enumerate(old)}
        work.inserted += state is None
        work.text_changed += 1
        work.chunks += len(chunks)
        for i, (chunk, ref) in enumerate(zip(chunks, refs, strict=True)):
            after = _chunk_payload(new.payload, text, refs, i, store_text)
            known = had.get(ref[0])
            if known is None or known[1][1] != ref[1]:  # a new text (or unknown after a crash)
                work.upserts.append(
                    _Upsert(
                        key=key,
                        state=st,
                        id=ref[0],
                        text_hash=ref[1],
                        payload=after,
                        text=chunk.text,
                        fresh=known is None,
                    )
                )
                continue
            assert state is not None
            j, was = known
            before = {
                **state.payload,
                "_vs_text_hash": was[1],
                "chunk_index": j,
                "chunk_count": len(old),
                "chunk_start": was[2],
                "chunk_end": was[3],
            }
            if store_text:
                before["chunk_text"] = chunk.text  # the same id: the same text
            update = _payload_update(ref[0], before, after)
            if update.unset or set(update.set) - {"_vs_version"}:
                work.payload_only.append((st, update))
        ids = {ref[0] for ref in refs}
        work.drops.extend((new.key, pid) for pid in had if pid not in ids)
        work.state_only.append(st)
        return st

    async def _last_vectors(
        self, m: MappingRuntime, states: Sequence[RecordState]
    ) -> dict[str, list[float]]:
        """The vectors last written for these records, by text hash: an in-flight batch's,
        else the embedding cache's (a vector conflict is found by comparing with them)."""
        hashes = {st.text_hash for st in states}
        found = {h: self._inflight_vectors[h] for h in hashes if h in self._inflight_vectors}
        missing = sorted(hashes - set(found))
        if missing:
            found.update(await self.state.cached_vectors(m.embedder.model_id, missing))
        return found

    def _resolved(
        self,
        work: _MappingWork,
        resolver: Resolver,
        key: Key,
        source: dict[str, Any],
        state: RecordState | None,
        seen: _Seen,
    ) -> tuple[dict[str, Any], VectorResolution | None]:
        """A record's payload fields by the mapping's conflict policy: the source's, with
        the sink values kept earlier over it, and the sink edits found now resolved (see
        conflicts), and what becomes of its vector. What is kept, logged and written back
        is noted in ``work``."""
        skey = str(key)
        before = dict(seen.kept.get(skey) or {})
        marker = before.pop(KEPT_VECTOR, None)
        fields, still = apply_kept(source, before)
        rec = seen.held.get(state.point_id) if state is not None else None
        if skey in seen.unsettled:
            rec = None
        vec = None
        if state is not None and rec is not None:
            res = resolver.resolve(skey, state.payload, fields, rec.payload)
            vec = resolver.resolve_vector(
                base=seen.bases.get(state.text_hash),
                sink=rec,
                parts=vector_parts(work.mapping.embedder),
                text_hash=seen.text_hash,
                text_changed=state.text_hash != seen.text_hash,
                kept=marker,
                source_payload=fields,  # the source's side, before resolution
            )
            if vec is not None and vec.kept is not None:
                still[KEPT_VECTOR] = vec.kept
            if vec is not None and vec.logged is not None:
                template = Conflict(
                    mapping=resolver.mapping,
                    key=skey,
                    policy=resolver.policy,
                    resolution="",
                    fields={},
                )
                work.conflicts.append(combined(res.conflict if res else None, vec, template))
            elif res is not None:
                work.conflicts.append(res.conflict)
            if res is not None:
                fields = res.payload
                still.update((f, (v, source.get(f))) for f, (v, _) in res.kept.items())
                back = {f: still.pop(f)[0] for f in list(still) if f in resolver.columns}
                if back and work.mapping.config.write_back:
                    work.write_back.append((key, back))
                else:
                    still.update((f, (v, source.get(f))) for f, v in back.items())
        if still != seen.kept.get(skey, {}):
            work.kept[skey] = still or None
        return fields, vec

    def _withdraw(self, work: _MappingWork, skey: str) -> list[str]:
        """Take a record out of the batch (it is dead-lettered: its state stays as it was);
        returns the new points it had written already."""
        written = [u.id for u in work.upserts if u.state.key == skey and u.fresh]
        work.upserts = [u for u in work.upserts if u.state.key != skey]
        work.payload_only = [p for p in work.payload_only if p[0].key != skey]
        work.drops = [d for d in work.drops if d[0] != skey]
        work.state_only = [st for st in work.state_only if st.key != skey]
        if skey in work.done:
            work.done.remove(skey)
        return written

    def _truncated_text(self, work: _MappingWork, key: Key) -> None:
        work.truncated += 1
        m = work.mapping
        if m.name in self._truncation_logged:
            return
        self._truncation_logged.add(m.name)
        logger.warning(
            "mapping %s: text of key %s is over max_text_length=%d characters and is embedded "
            "cut to it (this is logged once; the count is in status as 'truncated'); "
            'set long_text = "dead_letter" to refuse such records instead',
            m.name,
            key,
            m.config.text_limit,
            extra={"action": "text_truncated", "mapping": m.name},
        )

    def _plan_state(
        self, batch: _Batch, key_pair: tuple[str, str], planned: RecordState | None
    ) -> None:
        batch.planned.append((key_pair, planned))
        self._overlay[key_pair] = planned

    async def _states(self, mapping: str, keys: list[str]) -> dict[str, RecordState]:
        stored = await self.state.record_states(mapping, keys)
        for key in keys:
            if (mapping, key) in self._overlay:
                planned = self._overlay[(mapping, key)]
                if planned is None:
                    stored.pop(key, None)
                else:
                    stored[key] = planned
        return stored

    # -- embed --------------------------------------------------------------------------
    async def _embed(self, work: _MappingWork) -> None:
        if not work.upserts:
            return
        embedder = work.mapping.embedder
        vectors: dict[str, list[float]] = {}
        wanted = list(dict.fromkeys(u.text_hash for u in work.upserts))
        for h in wanted:
            if h in self._inflight_vectors:
                vectors[h] = self._inflight_vectors[h]
        if self._use_cache:
            missing = [h for h in wanted if h not in vectors]
            if missing:
                vectors.update(await self.state.cached_vectors(embedder.model_id, missing))
        work.cache_hits = len(vectors)
        texts = {u.text_hash: u.text for u in work.upserts if u.text_hash not in vectors}
        rejected: dict[str, RecordError] = {}
        # All at once: the embedder sorts them by length, so its batches pad least, and runs
        # its batches side by side (bench/bench_embed.py)
        if texts:
            found = await self._embed_isolating(embedder, list(texts.items()), rejected, work)
            vectors.update(found)
        work.embedded = len(texts) - len(rejected)
        refused: dict[str, _Upsert] = {}
        for u in work.upserts:
            if u.text_hash in rejected:
                refused.setdefault(u.state.key, u)
        for skey, u in refused.items():  # a chunk refused: its whole record is
            change = Change(
                table=work.mapping.config.table,
                key=u.key,
                op="update",
                position=u.state.source_version,
            )
            error = rejected[u.text_hash]
            work.failed.append(_dead_letter(work.mapping.name, u.key, change, error, None))
            self._withdraw(work, skey)
        for u in work.upserts:
            u.vector = vectors[u.text_hash]
            self._inflight_vectors[u.text_hash] = u.vector

    async def _embed_isolating(
        self,
        embedder: Embedder,
        chunk: list[tuple[str, str]],
        rejected: dict[str, RecordError],
        work: _MappingWork,
    ) -> dict[str, list[float]]:
        """Embed a chunk; if the model rejects it, find the texts it rejects one by one."""
        texts = [t for _, t in chunk]

        async def embed() -> list[list[float]]:
            if not isinstance(embedder, Metered):
                return await embedder.embed(texts)
            vectors, tokens = await embedder.embed_metered(texts)
            work.tokens += tokens
            return vectors

        try:  # an endpoint that is down or overloaded: one error incident, retried
            vectors = await self._retry(f"embed with {embedder.name!r}", embed, self._stop)
        except RecordError as exc:
            if len(chunk) == 1:
                rejected[chunk[0][0]] = exc
                return {}
            # the embedder's own batches first, then one text at a time
            size = embedder.batch_size if len(chunk) > embedder.batch_size else 1
            found: dict[str, list[float]] = {}
            for i in range(0, len(chunk), size):
                part = chunk[i : i + size]
                found.update(await self._embed_isolating(embedder, part, rejected, work))
            return found
        if len(vectors) != len(chunk) or any(len(v) != embedder.dimension for v in vectors):
            raise PermanentError(
                f"embedder {embedder.name!r} returned {len(vectors)} vectors of the wrong shape "
                f"for {len(chunk)} texts (expected dimension {embedder.dimension})"
            )
        return {h: v for (h, _), v in zip(chunk, vectors, strict=True)}

    # -- write --------------------------------------------------------------------------
    async def _write_isolated(self, batch: _Batch, work: _MappingWork, stop: asyncio.Event) -> None:
        """Write a target of a several-sink mapping, or leave its share in the backlog:
        when its sink is down already, or when its writes fail for ``outage_after``."""
        name, outages = work.mapping.name, self._outages
        probe = batch.probe == name
        if work.deferred or (outages.is_down(name) and not probe):
            work.deferred = True
            return
        budget = outages.outage_after
        # failures retried for the budget; a slow call that succeeds is no outage (a call
        # that hangs ends as the sink client's own timeout error)
        backoff = replace(self._backoff, deadline=budget, max_attempts=None, maximum=budget / 4)
        try:
            await self._write(work, stop, backoff)
        except RetryableError as exc:
            work.deferred = True
            was_down = outages.is_down(name)
            outages.failed(name)
            if probe and self._once:
                outages.given_up.add(name)
            if not was_down:
                logger.error(
                    "sink %s of mapping %s is down (%s): its records are kept in its backlog "
                    "and caught up from the source when it is back; the mapping's other sinks "
                    "go on",
                    work.mapping.config.sink,
                    name,
                    describe(exc),
                    extra={"action": "sink_down", "mapping": name},
                )
            return
        if outages.is_down(name):
            outages.recovered(name)
            logger.warning(
                "sink %s of mapping %s is back: catching up its backlog",
                work.mapping.config.sink,
                name,
                extra={"action": "sink_back", "mapping": name},
            )

    async def _write(
        self, work: _MappingWork, stop: asyncio.Event, backoff: Backoff | None = None
    ) -> None:
        m = work.mapping
        sink, coll = m.sink, m.collection
        sparse = m.embedder.sparse_vectors if isinstance(m.embedder, NamedVectors) else None
        points = [
            Point(
                id=u.id,
                vector=u.vector or [],
                payload=u.payload,
                sparse=sparse(u.text) if sparse is not None else {},
                extra=u.extra,
            )
            for u in work.upserts
        ]
        rejected: dict[str, PermanentError] = {}
        for i in range(0, len(points), _WRITE_CHUNK):
            chunk = points[i : i + _WRITE_CHUNK]
            rejected.update(
                await self._isolating(
                    f"upsert into {coll}", chunk, partial(sink.upsert, coll), stop, backoff
                )
            )
            _failpoints.hit("after_sink_call")
        if rejected:  # before the payload updates: a refused record is written no further
            self._dead_letter_rejected(work, rejected)
            rejected = {}
        updates = [u for _, u in work.payload_only]
        missing: list[str] = []
        for i in range(0, len(updates), _WRITE_CHUNK):
            part = updates[i : i + _WRITE_CHUNK]
            rejected.update(
                await self._isolating(
                    f"payload update in {coll}",
                    part,
                    partial(self._update_payloads, sink, coll, missing),
                    stop,
                    backoff,
                )
            )
            _failpoints.hit("after_sink_call")
        if missing:
            # The point vanished from the sink behind our back: forget its state so that the
            # next change (or a consistency repair) writes it in full.
            logger.warning(
                "%d points of %s missing in the sink; their state is reset",
                len(missing),
                m.name,
                extra={"action": "sink_missing", "mapping": m.name, "count": len(missing)},
            )
            gone = set(missing)
            lost = {s.key: s for s, u in work.payload_only if u.id in gone}
            work.payload_only = [(s, u) for s, u in work.payload_only if s.key not in lost]
            work.state_only = [s for s in work.state_only if s.key not in lost]
            for s in lost.values():
                work.deletes.append((s.key, s.point_id))
                if s.chunks is not None:  # the record's other chunks go too: written anew
                    work.drops.extend((s.key, pid) for pid in s.point_ids)
        if rejected:
            self._dead_letter_rejected(work, rejected)
        if work.write_back:  # after the sink has the values: a crash between converges
            source = self.source
            assert isinstance(source, WritesBack), "config validation admits SQL sources only"
            for key, values in work.write_back:
                back = partial(source.write_back, m.spec, key, values)
                await self._retry(f"write back to {m.config.table}", back, stop, backoff)
                _failpoints.hit("after_write_back")
        ids = list(dict.fromkeys([*(pid for _, pid in work.deletes), *(p for _, p in work.drops)]))
        for i in range(0, len(ids), _WRITE_CHUNK):
            part_ids = ids[i : i + _WRITE_CHUNK]
            delete = partial(sink.delete, coll, part_ids)
            await self._retry(f"delete from {coll}", delete, stop, backoff)
            _failpoints.hit("after_sink_call")

    @staticmethod
    async def _update_payloads(
        sink: Sink, coll: str, missing: list[str], updates: Sequence[PayloadUpdate]
    ) -> None:
        missing.extend(await sink.update_payloads(coll, updates))

    async def _isolating(
        self,
        what: str,
        items: Sequence[Point] | Sequence[PayloadUpdate],
        call: Callable[[Any], Awaitable[Any]],
        stop: asyncio.Event,
        backoff: Backoff | None = None,
    ) -> dict[str, PermanentError]:
        """Write ``items``; if the sink rejects the batch permanently, bisect it to find the
        points it rejects (returned by id) and write the rest."""
        try:
            await self._retry(what, partial(call, items), stop, backoff)
            return {}
        except PermanentError as exc:
            if len(items) == 1:
                return {items[0].id: exc}
            mid = len(items) // 2
            return {
                **await self._isolating(what, items[:mid], call, stop, backoff),
                **await self._isolating(what, items[mid:], call, stop, backoff),
            }

    def _dead_letter_rejected(
        self, work: _MappingWork, rejected: dict[str, PermanentError]
    ) -> None:
        """Dead-letter the records whose points the sink refused, whole: a chunked record's
        chunks written already are deleted again, its state stays as it was."""
        refused: dict[str, tuple[Key, RecordState, PermanentError]] = {}
        for u in work.upserts:
            if u.id in rejected:
                refused.setdefault(u.state.key, (u.key, u.state, rejected[u.id]))
        for state, update in work.payload_only:
            if update.id in rejected:
                key = state.payload.get("_vs_key", state.key)
                refused.setdefault(state.key, (key, state, rejected[update.id]))
        table = work.mapping.config.table
        for skey, (key, state, exc) in refused.items():
            error = RecordError(f"the sink rejected the point: {exc}", kind="sink_rejected")
            error.__cause__ = exc
            change = Change(table=table, key=key, op="update", position=state.source_version)
            work.failed.append(_dead_letter(work.mapping.name, key, change, error, None))
            written = self._withdraw(work, skey)
            if state.chunks is not None:
                work.drops.extend((skey, pid) for pid in written if pid not in rejected)

    def _commit_for(self, batch: _Batch) -> BatchCommit:
        commit = BatchCommit(
            source=self.source.name,
            position=batch.position,
            run_id=self.run_id,
            epoch=self._epoch,
            lease=self.lease,
            checkpoints=list(batch.checkpoints),
        )
        for work in batch.work:
            name = work.mapping.name
            model = work.mapping.embedder.model_id
            if work.deferred:  # its sink is down: nothing written, its keys kept to catch up
                refused = {d.key for d in work.failed}
                commit.backlog.extend((name, k) for k in work.keys if k not in refused)
                commit.dead_letters.extend(work.failed)
                for name_, n in self._counts(work).items():
                    commit.count(name, name_, n)
                continue
            if batch.probe == name:
                commit.caught_up.extend((name, k) for k in batch.caught)
            states = {
                st.key: st
                for st in (
                    *(u.state for u in work.upserts),
                    *(st for st, _ in work.payload_only),
                    *work.state_only,
                )
            }  # one per record: a chunked record's chunks share it
            commit.upserts.extend(states.values())
            commit.deletes.extend(dict.fromkeys((name, key) for key, _ in work.deletes))
            if self._use_cache:
                commit.vectors.update(
                    (u.text_hash, (model, u.vector)) for u in work.upserts if u.vector
                )
            commit.dead_letters.extend(work.failed)
            commit.conflicts.extend(work.conflicts)
            commit.kept.update(((name, k), v) for k, v in work.kept.items())
            pending = self._pending_dlq.setdefault(name, set())
            commit.resolved.extend((name, k) for k in work.done if k in pending)
            for name_, n in self._counts(work).items():
                commit.count(name, name_, n)
        return commit

    @staticmethod
    def _counts(work: _MappingWork) -> dict[str, int]:
        embedder = work.mapping.embedder
        price = embedder.price_per_million_tokens if isinstance(embedder, Metered) else None
        billed = {
            "tokens": work.tokens,
            # in millionths of the price's currency: counters are integers
            "cost_micros": round(work.tokens * price) if price is not None else 0,
        }
        if work.deferred:
            return {
                "processed": work.processed,
                "deferred": len(work.keys) - len(work.failed),
                "failed": len(work.failed),
                "embedded": work.embedded,
                "cache_hits": work.cache_hits,
                **billed,
            }
        return {
            **billed,
            "processed": work.processed,
            "inserted": work.inserted,
            "updated": work.text_changed - work.inserted,
            "bytes": work.bytes,
            "upserted": len(work.upserts),
            "payload_only": len(work.payload_only),
            "deleted": len(work.deletes),
            "chunks": work.chunks,
            "chunks_deleted": len(work.drops),
            "skipped": work.skipped,
            "failed": len(work.failed),
            "embedded": work.embedded,
            "cache_hits": work.cache_hits,
            "truncated": work.truncated,
        }

    def _settle(self, batch: _Batch) -> None:
        """After the commit: drop overlay entries this batch planned (unless re-planned)."""
        for key_pair, planned in batch.planned:
            if self._overlay.get(key_pair, planned) is planned:
                self._overlay.pop(key_pair, None)
        if batch.probe is not None:
            self._outages.probing.discard(batch.probe)
        for work in batch.work:
            flying = self._outages.in_flight
            flying[work.mapping.name] = flying.get(work.mapping.name, 1) - 1
            for u in work.upserts:
                self._inflight_vectors.pop(u.text_hash, None)
                if u.extra and self._inflight_foreign.get(u.id) is u.extra.get(FOREIGN):
                    del self._inflight_foreign[u.id]
            if work.deferred:
                self._outages.behind.add(work.mapping.name)
            pending = self._pending_dlq.setdefault(work.mapping.name, set())
            if not work.deferred:
                pending.difference_update(work.done)
            pending.update(d.key for d in work.failed)
            for d in work.failed:
                logger.warning(
                    "record dead-lettered: %s %s: %s",
                    work.mapping.name,
                    d.key,
                    d.message,
                    extra={"action": "dead_letter", "mapping": work.mapping.name, "key": d.key},
                )

    def queue_depth(self) -> int:
        return sum(q.qsize() for q in self._queues)

    def _report(self, batch: _Batch, target: int | None) -> None:
        now = time.time()
        oldest = now
        for committed_at in batch.committed_at:
            if committed_at:
                self.stats.latency.observe(max(0.0, now - committed_at))
                oldest = min(oldest, committed_at)
        if batch.changes:
            self.stats.batch_sizes.observe(batch.changes)
        counts: dict[str, int] = {}
        for work in batch.work:
            per_mapping = self.stats.mappings.setdefault(work.mapping.name, {})
            for k, n in self._counts(work).items():
                counts[k] = counts.get(k, 0) + n
                self.totals[k] = self.totals.get(k, 0) + n
                per_mapping[k] = per_mapping.get(k, 0) + n
        self.totals["changes"] = self.totals.get("changes", 0) + batch.changes
        logger.info(
            "batch committed",
            extra={
                "action": "batch_commit",
                "source": self.source.name,
                "position": batch.position,
                "changes": batch.changes,
                "latency_max_s": round(now - oldest, 4),  # source commit → written, oldest
                **counts,
            },
        )
        if self._on_batch is not None:
            self._on_batch(
                BatchReport(
                    source=self.source.name,
                    position=batch.position,
                    target=target,
                    changes=batch.changes,
                    counts=counts,
                    mappings={w.mapping.name: self._counts(w) for w in batch.work},
                    dead_letters=[d for w in batch.work for d in w.failed],
                    backfill=_progress(batch.backfill),
                )
            )


def _progress(bf: Backfill | None) -> dict[str, Any] | None:
    if bf is None:
        return None
    return {
        "mapping": bf.mapping,
        "version": bf.version,
        "done": bf.done,
        "total": bf.total,
        "rate": bf.rate(),
        "eta": bf.eta(),
        "finished": bf.finished or (bf.after is None and bf.done > 0),
    }


def _chunk_payload(
    payload: Mapping[str, Any], text: str, refs: Sequence[ChunkRef], i: int, store_text: bool
) -> dict[str, Any]:
    """A chunk point's payload: the record's, its own text hash and place among the
    record's chunks (and its text, when the mapping stores it)."""
    _, text_hash, start, end = refs[i]
    out = {
        **payload,
        "_vs_text_hash": text_hash,
        "chunk_index": i,
        "chunk_count": len(refs),
        "chunk_start": start,
        "chunk_end": end,
    }
    if store_text:
        out["chunk_text"] = text[start:end]
    return out


def _chunk_points(work: Sequence[_MappingWork]) -> dict[tuple[str, str], list[str]]:
    """Per chunked record of a batch: the points it will have written (see journal)."""
    out: dict[tuple[str, str], list[str]] = {}
    for w in work:
        if w.mapping.chunker is None:
            continue
        for key in (
            *(u.state.key for u in w.upserts),
            *(st.key for st, _ in w.payload_only),
            *(k for k, _ in w.deletes),
            *(k for k, _ in w.drops),
        ):
            out.setdefault((w.mapping.name, key), [])
        for u in w.upserts:
            out[(w.mapping.name, u.state.key)].append(u.id)
    return out


def _ours(held: Mapping[str, Any], payload: Mapping[str, Any]) -> dict[str, Any]:
    """Of a point's payload as read, the fields a write of ``payload`` replaces or drops
    (ours: bookkeeping and the mapping's fields; others' stay as they are)."""
    return {k: v for k, v in held.items() if k in payload or k.startswith("_vs_")}


def _payload_update(pid: str, old: Mapping[str, Any], new: dict[str, Any]) -> PayloadUpdate:
    """Only the fields that differ from what was last written (set) or were dropped (unset)."""
    missing = object()
    changed = {k: v for k, v in new.items() if old.get(k, missing) != v}
    unset = tuple(k for k in old if k not in new)
    return PayloadUpdate(id=pid, set=changed, unset=unset, payload=new)


def _dead_letter(
    mapping: str, key: Key, change: Change, exc: RecordError, row: dict[str, Any] | None
) -> DeadLetter:
    error_type, code = classify(exc)
    details: dict[str, Any] = {
        "table": change.table,
        "op": change.op,
        "key": key,
        "error_code": code,
    }
    if row is not None:
        details["row"] = {
            k: (v[:_DETAIL_CHARS] if isinstance(v, str) else v) for k, v in row.items()
        }
    return DeadLetter(
        mapping=mapping,
        key=key_text(key),
        operation=change.op,
        error_type=error_type,
        message=str(exc),
        details=details,
        position=change.position,
        stack_trace=_trace(exc),
    )


def _shown(key: Any) -> str:
    text = repr(key)
    return text if len(text) <= 60 else text[:57] + "..."


def _trace(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))
