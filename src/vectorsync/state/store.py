"""The state store on SQLAlchemy Core: one code path for SQLite and PostgreSQL.

A batch's outcome (record state, cached vectors, dead letters, counters and the new
position) is committed in one transaction, after the sink acknowledged its writes: that
ordering is the no-loss guarantee.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import struct
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson
from sqlalchemy import (
    Connection,
    Engine,
    Table,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    select,
    text,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from .._blocking import BlockingLane
from ..conflicts import Conflict, Kept
from ..errors import PermanentError, RetryableError
from ..index import versions as index_log
from ..model import Key, RecordState, dumps, key_bucket
from ..redact import redact, redact_value
from . import conflict_log
from . import journal as write_journal
from . import leases as lease_log
from . import runs as run_log
from . import schema as s
from .migrations import migrate

__all__ = ["BatchCommit", "DeadLetter", "MappingCounts", "StateStore"]

T = TypeVar("T")
_CHUNK = 500
_LOW31 = (1 << 31) - 1
_STATE_COLUMNS = (
    "mapping",
    "key",
    "point_id",
    "text_hash",
    "payload_hash",
    "source_version",
    "schema_version",
    "synced_at",
    "payload",
    "bucket",
    "digest_hi",
    "digest_lo",
    "chunks",
    "points",
)
# Expanding parameters: compiled once and cached, instead of one bound parameter per key.
_STATES = select(s.record_state).where(
    s.record_state.c.mapping == bindparam("mapping"),
    s.record_state.c.key.in_(bindparam("keys", expanding=True)),
)
_VECTORS = select(s.embedding_cache.c.text_hash, s.embedding_cache.c.vector).where(
    s.embedding_cache.c.model == bindparam("model"),
    s.embedding_cache.c.text_hash.in_(bindparam("hashes", expanding=True)),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    mapping: str
    key: str
    operation: str
    error_type: str  # connection | timeout | validation | render | embedding | sink | unknown
    message: str
    details: dict[str, Any]  # table, op, key (native), error_code, row
    position: int
    error_count: int = 1
    status: str = "pending"  # pending | processing | resolved | discarded
    run_id: int | None = None
    error_log_id: int | None = None
    stack_trace: str | None = field(default=None, repr=False)
    id: int | None = None
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass(slots=True, kw_only=True)
class BatchCommit:
    """Everything one batch changes in the state store, applied atomically."""

    source: str
    position: int
    run_id: int | None = None
    epoch: str | None = None  # the capture epoch the position belongs to (Source.epoch)
    lease: tuple[str, str, int] | None = None  # (name, holder, token): fences the commit
    # backfill progress committed with the records it wrote: (mapping, version, last key,
    # records, done)
    checkpoints: list[tuple[str, int, Key | None, int, bool]] = field(default_factory=list)
    upserts: list[RecordState] = field(default_factory=list)
    deletes: list[tuple[str, str]] = field(default_factory=list)  # (mapping, key)
    vectors: dict[str, tuple[str, list[float]]] = field(default_factory=dict)  # hash → (model, v)
    backlog: list[tuple[str, str]] = field(default_factory=list)  # (mapping, key) left behind
    caught_up: list[tuple[str, str]] = field(default_factory=list)  # (mapping, key) written now
    dead_letters: list[DeadLetter] = field(default_factory=list)
    resolved: list[tuple[str, str]] = field(default_factory=list)  # (mapping, key) now synced
    counters: dict[tuple[str, str], int] = field(default_factory=dict)  # (mapping, name) → +n
    conflicts: list[Conflict] = field(default_factory=list)
    kept: dict[tuple[str, str], Kept | None] = field(default_factory=dict)  # conflicts.Kept

    def count(self, mapping: str, name: str, n: int = 1) -> None:
        if n:
            self.counters[(mapping, name)] = self.counters.get((mapping, name), 0) + n


@dataclass(frozen=True, slots=True, kw_only=True)
class MappingCounts:
    records: int
    outdated: int  # records written under an older schema version (template, model, ...)
    dead_letters: int
    counters: dict[str, int]


@contextlib.contextmanager
def wrap_errors(what: str) -> Iterator[None]:
    try:
        yield
    except sa_exc.OperationalError as exc:
        code = getattr(exc.orig, "sqlite_errorname", None) or getattr(exc.orig, "sqlstate", None)
        raise RetryableError(f"state store: {what}: {exc.orig}", code=code) from exc
    except sa_exc.SQLAlchemyError as exc:
        raise PermanentError(f"state store: {what}: {exc}") from exc


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode = WAL")
    cur.execute("PRAGMA synchronous = NORMAL")
    cur.execute("PRAGMA busy_timeout = 30000")
    cur.close()


def encode_vector(vector: Sequence[float]) -> bytes:
    """float32 values, packed by a struct compiled per dimension: 4x faster than an
    ``array`` built from a list."""
    return _packer(len(vector)).pack(*vector)


@functools.cache
def _packer(dimension: int) -> struct.Struct:
    return struct.Struct(f"{dimension}f")


def decode_vector(blob: bytes) -> list[float]:
    values = array("f")
    values.frombytes(blob)
    return values.tolist()


class StateStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self._lane = BlockingLane("state")
        self._engine: Engine | None = None

    async def open(self) -> None:
        await self._lane.run(self._open)

    def _open(self) -> None:
        url = make_url(self.url)
        if url.drivername in ("postgresql", "postgres"):
            url = url.set(drivername="postgresql+psycopg")  # psycopg 3
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, pool_pre_ping=url.get_backend_name() == "postgresql")
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
        where = url.render_as_string(hide_password=True)
        sqlite_file = engine.dialect.name == "sqlite" and url.database not in (None, "", ":memory:")
        try:
            with (
                wrap_errors(f"open {where}"),
                _file_lock(Path(f"{url.database}.lock"))
                if sqlite_file
                else contextlib.nullcontext(),
                engine.begin() as conn,
            ):
                if engine.dialect.name == "postgresql":  # one migrator at a time
                    conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('vectorsync-state'))"))
                migrate(conn)
        except BaseException:
            engine.dispose()
            raise
        self._engine = engine

    async def close(self) -> None:
        if self._engine is not None:
            await self._lane.run(self._engine.dispose)
            self._engine = None
        self._lane.shutdown()

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("state store is not open")
        return self._engine

    def _upsert(
        self, conn: Connection, table: Table, rows: list[dict[str, Any]], keys: list[str]
    ) -> None:
        if rows:
            columns = tuple(rows[0])
            _upsert_rows(conn, table, columns, keys, [tuple(r.values()) for r in rows])

    # -- positions ----------------------------------------------------------------------
    async def position(self, source: str, epoch: str | None = None) -> int:
        """The applied position of a source; 0 when it was stored under another capture
        epoch than ``epoch`` (capture re-installed: its positions restarted)."""
        return await self._lane.run(self._position, source, epoch)

    def _position(self, source: str, epoch: str | None) -> int:
        with wrap_errors("read position"), self.engine.connect() as conn:
            return _stream_position(conn, source, epoch)

    async def set_position(
        self, source: str, position: int, *, table: str = "", run_id: int | None = None
    ) -> None:
        """Set a stream position (per source, or per table of a source)."""
        await self._tx(
            "write position", self._set_marker, source, table, "stream", position, None, run_id
        )

    async def batch_timestamp(self, source: str, table: str = "") -> datetime | None:
        """The timestamp marker of a batch (timestamp-based) sync, per source or table."""

        def read(conn: Connection) -> Any:
            return conn.scalar(_marker_query(source, table, "batch", s.positions.c.position_data))

        value = await self._tx("read batch timestamp", read)
        return None if value is None else datetime.fromisoformat(value)

    async def set_batch_timestamp(
        self, source: str, when: datetime, *, table: str = "", run_id: int | None = None
    ) -> None:
        await self._tx(
            "write batch timestamp",
            self._set_marker,
            source,
            table,
            "batch",
            0,
            when.isoformat(),
            run_id,
        )

    def _set_marker(
        self,
        conn: Connection,
        source: str,
        table: str,
        kind: str,
        position: int,
        data: str | None,
        run_id: int | None,
    ) -> None:
        self._upsert(
            conn,
            s.positions,
            [
                {
                    "source": source,
                    "stream": table,
                    "marker_type": kind,
                    "position": position,
                    "position_data": data,
                    "run_id": run_id,
                    "updated_at": time.time(),
                }
            ],
            ["source", "stream", "marker_type"],
        )

    async def markers(self) -> list[dict[str, Any]]:
        """Every position marker: source, table ('' for the whole source), type, value."""

        def read(conn: Connection) -> list[dict[str, Any]]:
            return [dict(r._mapping) for r in conn.execute(select(s.positions))]

        return await self._tx("read markers", read)

    # -- record state -------------------------------------------------------------------
    async def record_states(self, mapping: str, keys: Sequence[str]) -> dict[str, RecordState]:
        return await self._lane.run(self._record_states, mapping, list(keys))

    def _record_states(self, mapping: str, keys: list[str]) -> dict[str, RecordState]:
        found: dict[str, RecordState] = {}
        with wrap_errors("read record state"), self.engine.connect() as conn:
            dialect = conn.dialect.name
            for i in range(0, len(keys), _CHUNK):
                part = keys[i : i + _CHUNK]
                # driver-level SQL: the ORM-free Core select spent more in row processing
                # than SQLite in the query (bench/bench_pipeline.py)
                sql = _states_sql(dialect, len(part))
                for r in conn.exec_driver_sql(sql, (mapping, *part)).fetchall():
                    found[r[1]] = _record_state(r)
        return found

    # -- conflicts (see conflicts) -------------------------------------------------------
    async def kept(self, mapping: str, keys: Sequence[str] | None = None) -> dict[str, Kept]:
        """Sink values kept over the source's, of ``keys`` (None: every record's)."""
        return await self._tx("read kept values", conflict_log.kept, mapping, keys)

    async def set_kept(self, entries: Mapping[tuple[str, str], Kept | None]) -> None:
        await self._tx("write kept values", conflict_log.set_kept, entries)

    async def journal_writes(self, entries: Sequence[write_journal.Entry]) -> None:
        """Journal writes of the write API before the source is written (see writer.py)."""
        await self._tx("journal writes", write_journal.add, entries)

    async def journaled(self, source: str | None = None) -> list[write_journal.Entry]:
        return await self._tx("read the write journal", write_journal.entries, source)

    async def unjournal(self, txn: str) -> None:
        await self._tx("clear journaled writes", write_journal.remove, txn)

    async def log_conflicts(self, entries: Sequence[Conflict]) -> None:
        await self._tx("log conflicts", conflict_log.log, entries)

    async def conflict_counts(self) -> list[tuple[str, str, str, int]]:
        """(mapping, policy, resolution — "open" for a check's finding not synced yet, n)."""
        return await self._tx("count conflicts", conflict_log.counts)

    async def close_conflicts(self, mapping: str, keys: Sequence[str]) -> None:
        """The open conflicts (a check's) of ``keys``: resolved, the source's values written."""
        await self._tx("close conflicts", conflict_log.close, mapping, keys)

    async def mark_conflict(self, conflict_id: int, resolution: str) -> None:
        await self._tx("resolve a conflict", conflict_log.mark, conflict_id, resolution)

    async def conflicts(
        self,
        *,
        mapping: str | None = None,
        ids: Sequence[int] | None = None,
        status: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        return await self._tx(
            "read conflicts",
            lambda conn: conflict_log.conflicts(
                conn, mapping=mapping, ids=ids, status=status, limit=limit
            ),
        )

    # -- embedding cache ----------------------------------------------------------------
    async def cached_vectors(self, model: str, hashes: Sequence[str]) -> dict[str, list[float]]:
        return await self._lane.run(self._cached_vectors, model, list(hashes))

    def _cached_vectors(self, model: str, hashes: list[str]) -> dict[str, list[float]]:
        found: dict[str, list[float]] = {}
        with wrap_errors("read embedding cache"), self.engine.connect() as conn:
            for i in range(0, len(hashes), _CHUNK):
                rows = conn.execute(_VECTORS, {"model": model, "hashes": hashes[i : i + _CHUNK]})
                found.update((h, decode_vector(v)) for h, v in rows)
        return found

    async def cache_vectors(self, model: str, vectors: Mapping[str, Sequence[float]]) -> None:
        """Keep ``vectors`` (text hash → vector) of ``model`` in the embedding cache now
        (a batch's vectors go in with its commit instead)."""
        now = time.time()
        rows = [(model, h, encode_vector(v), now) for h, v in vectors.items()]
        columns = ("model", "text_hash", "vector", "created_at")

        def write(conn: Connection) -> None:
            _upsert_rows(conn, s.embedding_cache, columns, ("model", "text_hash"), rows)

        await self._tx("write the embedding cache", write)

    async def cached_hashes(self, model: str, hashes: Sequence[str]) -> set[str]:
        """Which of ``hashes`` the embedding cache holds a vector of (vectors not read)."""
        t = s.embedding_cache

        def read(conn: Connection) -> set[str]:
            found: set[str] = set()
            for i in range(0, len(hashes), _CHUNK):
                query = select(t.c.text_hash).where(
                    t.c.model == model, t.c.text_hash.in_(list(hashes[i : i + _CHUNK]))
                )
                found.update(h for (h,) in conn.execute(query))
            return found

        return await self._tx("read the embedding cache", read)

    # -- the batch commit ---------------------------------------------------------------
    async def commit(self, batch: BatchCommit) -> None:
        await self._lane.run(self._commit, batch)

    def _commit(self, batch: BatchCommit) -> None:
        now = time.time()
        with wrap_errors("commit batch"), self.engine.begin() as conn:
            if batch.lease is not None:  # first: a commit after a takeover writes nothing
                lease_log.fence(conn, *batch.lease)
            self._apply_records(conn, batch)
            _upsert_rows(
                conn,
                s.embedding_cache,
                ("model", "text_hash", "vector", "created_at"),
                ("model", "text_hash"),
                # in key order: commits side by side take these rows' locks in one order
                sorted((m, h, encode_vector(v), now) for h, (m, v) in batch.vectors.items()),
            )
            self._apply_backlog(conn, batch, now)
            self._apply_dead_letters(conn, batch, now)
            conflict_log.log(conn, batch.conflicts)
            conflict_log.set_kept(conn, batch.kept)
            for checkpoint in batch.checkpoints:
                index_log.checkpoint(conn, *checkpoint)
            if batch.position >= _stream_position(conn, batch.source, batch.epoch):
                # never backwards within one epoch, whoever commits
                self._set_marker(
                    conn, batch.source, "", "stream", batch.position, batch.epoch, batch.run_id
                )
            j = s.inflight
            conn.execute(
                delete(j).where(j.c.source == batch.source, j.c.position <= batch.position)
            )
            self._apply_counters(conn, batch.counters)  # last: see there

    def _apply_records(self, conn: Connection, batch: BatchCommit) -> None:
        t = s.record_state
        dumps_ = orjson.dumps
        rows = [
            (
                r.mapping,
                r.key,
                r.point_id,
                r.text_hash,
                r.payload_hash,
                r.source_version,
                r.schema_version,
                r.synced_at,
                dumps_(r.payload).decode(),
                key_bucket(r.key),
                r.row_digest >> 31,
                r.row_digest & _LOW31,
                None if r.chunks is None else dumps_(r.chunks).decode(),
                1 if r.chunks is None else len(r.chunks),
            )
            for r in batch.upserts
        ]
        _upsert_rows(conn, t, _STATE_COLUMNS, ("mapping", "key"), rows)
        for mapping, keys in _group(batch.deletes).items():
            for i in range(0, len(keys), _CHUNK):
                conn.execute(
                    delete(t).where(t.c.mapping == mapping, t.c.key.in_(keys[i : i + _CHUNK]))
                )
        self._apply_deps(conn, batch)

    def _apply_backlog(self, conn: Connection, batch: BatchCommit, now: float) -> None:
        b = s.sink_backlog
        for mapping, keys in _group(batch.caught_up).items():
            for i in range(0, len(keys), _CHUNK):
                conn.execute(
                    delete(b).where(b.c.mapping == mapping, b.c.key.in_(keys[i : i + _CHUNK]))
                )
        _upsert_rows(
            conn,
            b,
            ("mapping", "key", "added_at"),
            ("mapping", "key"),
            [(m, k, now) for m, k in dict.fromkeys(batch.backlog)],
        )

    async def backlog(self, mapping: str, limit: int) -> list[str]:
        """The first ``limit`` keys (in key order) a sink of ``mapping`` was not written."""
        b = s.sink_backlog
        query = select(b.c.key).where(b.c.mapping == mapping).order_by(b.c.key).limit(limit)

        def read(conn: Connection) -> list[str]:
            return [k for (k,) in conn.execute(query)]

        return await self._tx("read the sink backlog", read)

    async def backlog_counts(self) -> dict[str, int]:
        """Per mapping: how many records one of its sinks is behind by."""
        b = s.sink_backlog
        query = select(b.c.mapping, func.count()).group_by(b.c.mapping)

        def read(conn: Connection) -> dict[str, int]:
            return {m: int(n) for m, n in conn.execute(query)}

        return await self._tx("count the sink backlog", read)

    def _apply_deps(self, conn: Connection, batch: BatchCommit) -> None:
        """Replace the related keys of every record written (or drop them if deleted)."""
        d = s.record_deps
        built = [r for r in batch.upserts if r.deps is not None]
        gone = _group([*((r.mapping, r.key) for r in built), *batch.deletes])
        for mapping, keys in gone.items():
            for i in range(0, len(keys), _CHUNK):
                conn.execute(
                    delete(d).where(d.c.mapping == mapping, d.c.key.in_(keys[i : i + _CHUNK]))
                )
        rows = [
            {
                "mapping": r.mapping,
                "relation": rel,
                "related_key": rk,
                "key": r.key,
                "native_key": orjson.dumps(r.payload.get("_vs_key", r.key)).decode(),
            }
            for r in built
            for rel, related in (r.deps or {}).items()
            for rk in dict.fromkeys(related)
        ]
        if rows:
            conn.execute(d.insert(), rows)

    def _apply_dead_letters(self, conn: Connection, batch: BatchCommit, now: float) -> None:
        t = s.dead_letter
        for dl in batch.dead_letters:
            error_id = run_log.log_error(
                conn,
                run_log.ErrorEntry(
                    error_type=dl.error_type,
                    error_code=dl.details.get("error_code"),
                    message=dl.message,
                    run_id=batch.run_id,
                    mapping=dl.mapping,
                    source=batch.source,
                    key=dl.key,
                    details={"position": dl.position},
                    stack_trace=dl.stack_trace,
                    record_data=dl.details.get("row"),
                ),
            )
            where = and_(t.c.mapping == dl.mapping, t.c.key == dl.key)
            previous = conn.scalar(select(t.c.error_count).where(where))
            values = {
                "operation": dl.operation,
                "error_type": dl.error_type,
                "message": redact(dl.message),
                "details": dumps(redact_value(dl.details)).decode(),
                "position": dl.position,
                "status": "pending",
                "updated_at": now,
                "run_id": batch.run_id,
                "error_log_id": error_id,
            }
            if previous is None:
                conn.execute(
                    t.insert().values(
                        mapping=dl.mapping, key=dl.key, error_count=1, created_at=now, **values
                    )
                )
            else:
                conn.execute(t.update().where(where).values(error_count=previous + 1, **values))
        for mapping, keys in _group(batch.resolved).items():
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i : i + _CHUNK]
                conn.execute(
                    t.update()
                    .where(
                        t.c.mapping == mapping,
                        t.c.key.in_(chunk),
                        t.c.status.in_(("pending", "processing")),
                    )
                    .values(status="resolved", updated_at=now)
                )
                run_log.resolve_record_errors(conn, mapping, chunk)

    def _apply_counters(self, conn: Connection, counters: Mapping[tuple[str, str], int]) -> None:
        """Add ``counters`` in one statement, in key order, last in the batch's transaction:
        every batch of every worker adds to these few rows, so each holds their row locks
        only while it commits (and always takes them in the same order)."""
        rows = sorted((m, name, n) for (m, name), n in counters.items() if n)
        columns = ("mapping", "name", "value")
        _upsert_rows(conn, s.mapping_counters, columns, columns[:2], rows, add=("value",))

    # -- schema registry ----------------------------------------------------------------
    async def register_schema(
        self, mapping: str, digest: str, definition: Mapping[str, Any]
    ) -> tuple[int, str | None]:
        """Record the mapping's definition; returns its version and, when that version is
        new, the kind of evolution (``create``, ``add_column``, ``template_change``, ...)."""
        return await self._lane.run(self._register_schema, mapping, digest, dict(definition))

    def _register_schema(
        self, mapping: str, digest: str, definition: dict[str, Any]
    ) -> tuple[int, str | None]:
        t = s.schema_registry
        with wrap_errors("register schema"), self.engine.begin() as conn:
            last = conn.execute(
                select(t.c.version, t.c.hash, t.c.definition)
                .where(t.c.mapping == mapping)
                .order_by(t.c.version.desc())
                .limit(1)
            ).first()
            if last is not None and last.hash == digest:
                return int(last.version), None
            version = 1 if last is None else int(last.version) + 1
            evolution = (
                "create" if last is None else _evolution(orjson.loads(last.definition), definition)
            )
            conn.execute(
                t.insert().values(
                    mapping=mapping,
                    version=version,
                    hash=digest,
                    definition=orjson.dumps(definition, option=orjson.OPT_SORT_KEYS).decode(),
                    evolution=evolution,
                    previous_version=None if last is None else last.version,
                    created_at=time.time(),
                )
            )
        return version, evolution

    async def current_sync_digest(self, mapping: str) -> str | None:
        versions = await self.schema_versions(mapping)
        return versions[-1]["definition"].get("sync_digest") if versions else None

    # -- reading for status -------------------------------------------------------------
    async def mapping_counts(self, mapping: str) -> MappingCounts:
        current = await self.current_sync_digest(mapping)
        return await self._lane.run(self._mapping_counts, mapping, current)

    def _mapping_counts(self, mapping: str, current: str | None) -> MappingCounts:
        rs, dl, mc = s.record_state, s.dead_letter, s.mapping_counters
        with wrap_errors("read status"), self.engine.connect() as conn:
            records = conn.scalar(select(func.count()).where(rs.c.mapping == mapping)) or 0
            outdated = (
                conn.scalar(
                    select(func.count()).where(
                        rs.c.mapping == mapping, rs.c.schema_version != current
                    )
                )
                if current
                else 0
            )
            dead = (
                conn.scalar(
                    select(func.count()).where(dl.c.mapping == mapping, dl.c.status == "pending")
                )
                or 0
            )
            counters = dict(
                conn.execute(select(mc.c.name, mc.c.value).where(mc.c.mapping == mapping)).all()
            )
        return MappingCounts(
            records=int(records),
            outdated=int(outdated or 0),
            dead_letters=int(dead),
            counters={k: int(v) for k, v in counters.items()},
        )

    async def dead_letters(
        self,
        mapping: str | None = None,
        status: str | None = "pending",
        ids: Sequence[int] | None = None,
    ) -> list[DeadLetter]:
        t = s.dead_letter
        query = select(t).order_by(t.c.id)
        if mapping is not None:
            query = query.where(t.c.mapping == mapping)
        if status is not None:
            query = query.where(t.c.status == status)
        if ids is not None:
            query = query.where(t.c.id.in_(list(ids)))

        def read(conn: Connection) -> list[DeadLetter]:
            rows = conn.execute(query).mappings().all()
            return [DeadLetter(**{**r, "details": orjson.loads(r["details"])}) for r in rows]

        return await self._tx("read dead letters", read)

    async def add_dead_letters(
        self, source: str, letters: Sequence[DeadLetter], *, run_id: int | None = None
    ) -> None:
        """Dead-letter records (each with an error-log entry) outside a sync batch."""
        batch = BatchCommit(source=source, position=0, run_id=run_id, dead_letters=list(letters))

        def write(conn: Connection) -> None:
            self._apply_dead_letters(conn, batch, time.time())

        await self._tx("add dead letters", write)

    async def set_dead_letter_status(self, ids: Sequence[int], status: str) -> int:
        """Move dead letters to processing (replay), discarded or pending; returns how many."""
        t = s.dead_letter

        def write(conn: Connection) -> int:
            result = conn.execute(
                t.update()
                .where(t.c.id.in_(list(ids)))
                .values(status=status, updated_at=time.time())
            )
            if status == "discarded":
                error_ids = select(t.c.error_log_id).where(t.c.id.in_(list(ids)))
                conn.execute(
                    s.error_log.update()
                    .where(s.error_log.c.id.in_(error_ids))
                    .values(status="ignored", updated_at=time.time())
                )
            return int(result.rowcount)

        return await self._tx("update dead letters", write)

    # -- runs, errors, statistics, retention (see state/runs.py) --------------------------
    async def _tx(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        def call() -> T:
            with wrap_errors(what), self.engine.begin() as conn:
                return fn(conn, *args, **kwargs)

        return await self._lane.run(call)

    async def acquire_lease(
        self, name: str, holder: str, *, ttl: float, run_id: int | None = None
    ) -> int:
        """Take a lease (see state/leases.py); its token, or LeaseHeld naming the holder."""
        return await self._tx(
            "acquire lease", lease_log.acquire, name, holder, ttl=ttl, run_id=run_id
        )

    async def renew_lease(self, name: str, holder: str, token: int, *, ttl: float) -> None:
        await self._tx("renew lease", lease_log.renew, name, holder, token, ttl=ttl)

    async def release_lease(self, name: str, holder: str) -> None:
        await self._tx("release lease", lease_log.release, name, holder)

    async def leases(self) -> list[lease_log.Lease]:
        return await self._tx("read leases", lease_log.holders)

    # -- index versions (see index/versions.py) --------------------------------------------
    async def index_versions(self, mapping: str | None = None) -> list[index_log.IndexVersion]:
        return await self._tx("read index versions", index_log.versions, mapping)

    async def add_index_version(self, mapping: str, **kwargs: Any) -> index_log.IndexVersion:
        return await self._tx("add an index version", index_log.add_version, mapping, **kwargs)

    async def set_index_state(self, mapping: str, version: int, state: Any) -> None:
        await self._tx("change an index version", index_log.set_state, mapping, version, state)

    async def set_index_collection(self, mapping: str, version: int, collection: str) -> None:
        await self._tx(
            "move an index version", index_log.set_collection, mapping, version, collection
        )

    async def swap_index(
        self, mapping: str, live: index_log.IndexVersion, building: index_log.IndexVersion
    ) -> None:
        await self._tx("swap index versions", index_log.swap, mapping, live, building)

    async def reset_backfill(self, mapping: str, version: int) -> None:
        """Start a version's backfill over (after it did not verify)."""
        await self._tx("restart a backfill", index_log.restart_backfill, mapping, version)

    async def forget_index_state(self, name: str) -> None:
        await self._tx("drop an index version's state", index_log.forget_state, name)

    async def version_digests(self, name: str, keys: Sequence[str]) -> dict[str, int]:
        return await self._tx("read a version's digests", index_log.keys_in, name, list(keys))

    async def start_run(self, **kwargs: Any) -> int:
        return await self._tx("start run", run_log.start_run, **kwargs)

    async def heartbeat(self, run_id: int, counts: run_log.RunCounts) -> None:
        await self._tx("run heartbeat", run_log.heartbeat, run_id, counts)

    async def complete_run(self, run_id: int, **kwargs: Any) -> None:
        await self._tx("complete run", run_log.complete_run, run_id, **kwargs)

    async def recover_runs(self, *, stale_after: float = 60.0) -> list[int]:
        return await self._tx("recover runs", run_log.recover_runs, stale_after=stale_after)

    async def runs(self, *, limit: int = 20, run_id: int | None = None) -> list[run_log.SyncRun]:
        return await self._tx("read runs", run_log.runs, limit=limit, run_id=run_id)

    async def log_error(self, entry: run_log.ErrorEntry) -> int:
        return await self._tx("log error", run_log.log_error, entry)

    async def update_error(self, error_id: int, **kwargs: Any) -> None:
        await self._tx("update error", run_log.update_error, error_id, **kwargs)

    async def errors(
        self, *, status: str | None = None, limit: int = 100
    ) -> list[run_log.ErrorEntry]:
        return await self._tx("read errors", run_log.errors, status=status, limit=limit)

    async def statistics(self, *, hours: float | None = 24.0) -> dict[str, Any]:
        return await self._tx("statistics", run_log.statistics, hours=hours)

    async def cleanup(
        self, *, retention_days: float, keep_schema_versions: int = 10
    ) -> dict[str, int]:
        return await self._tx(
            "cleanup",
            run_log.cleanup,
            retention_days=retention_days,
            keep_schema_versions=keep_schema_versions,
        )

    async def bucket_sums(self, mapping: str) -> tuple[dict[int, tuple[int, int]], int, int]:
        """Per digest bucket: the sums of the row-digest halves of every synced record; the
        number of records, and of the points they were written as — aggregated inside the
        database."""
        t = s.record_state

        def read(conn: Connection) -> tuple[dict[int, tuple[int, int]], int, int]:
            rows = conn.execute(
                select(
                    t.c.bucket,
                    func.sum(t.c.digest_hi),
                    func.sum(t.c.digest_lo),
                    func.count(),
                    func.sum(t.c.points),
                )
                .where(t.c.mapping == mapping)
                .group_by(t.c.bucket)
            )
            sums, total, points = {}, 0, 0
            for bucket, hi, lo, n, p in rows:
                sums[int(bucket)] = (int(hi), int(lo))
                total += int(n)
                points += int(p)
            return sums, total, points

        return await self._tx("sum digests", read)

    async def bucket_digests(self, mapping: str, buckets: Sequence[int]) -> dict[str, int]:
        """Key → row digest of the records in some buckets (to drill into a difference)."""
        t = s.record_state

        def read(conn: Connection) -> dict[str, int]:
            rows = conn.execute(
                select(t.c.key, t.c.digest_hi, t.c.digest_lo).where(
                    t.c.mapping == mapping, t.c.bucket.in_(list(buckets))
                )
            )
            return {k: (hi << 31) | lo for k, hi, lo in rows}

        return await self._tx("read digests", read)

    async def record_digests(self, mapping: str, keys: Sequence[Key]) -> dict[Key, int]:
        """Key → row digest as last synced, for the given keys that have record state."""
        t = s.record_state
        by_text = {str(k): k for k in keys}

        def read(conn: Connection) -> dict[Key, int]:
            found: dict[Key, int] = {}
            names = list(by_text)
            for i in range(0, len(names), _CHUNK):
                rows = conn.execute(
                    select(t.c.key, t.c.digest_hi, t.c.digest_lo).where(
                        t.c.mapping == mapping, t.c.key.in_(names[i : i + _CHUNK])
                    )
                )
                found.update((by_text[k], (hi << 31) | lo) for k, hi, lo in rows)
            return found

        return await self._tx("read digests", read)

    async def keys(self, mapping: str) -> list[str]:
        """Every key a mapping holds (a TRUNCATE re-checks them all)."""
        t = s.record_state

        def read(conn: Connection) -> list[str]:
            return [k for (k,) in conn.execute(select(t.c.key).where(t.c.mapping == mapping))]

        return await self._tx("read keys", read)

    async def journal(
        self,
        source: str,
        position: int,
        records: Sequence[tuple[str, str]],
        chunks: Mapping[tuple[str, str], Sequence[str]] | None = None,
    ) -> None:
        """Record the (mapping, key) pairs a batch is about to write to sinks, and the new
        chunk point ids of chunked records; its commit drops the entry (see
        :meth:`redo_inflight`)."""
        chunks = chunks or {}
        entries = (
            [[m, k, list(chunks[(m, k)])] if (m, k) in chunks else [m, k] for m, k in records]
            if chunks
            else records  # (mapping, key) tuples: JSON arrays as they are
        )
        row = {
            "source": source,
            "position": position,
            "records": orjson.dumps(entries).decode(),
            "created_at": time.time(),
        }

        def write(conn: Connection) -> None:
            self._upsert(conn, s.inflight, [row], ["source", "position"])

        await self._tx("journal batch", write)

    async def redo_inflight(self, source: str) -> int:
        """After a crash between sink writes and their state commit: forget the record
        state of every key those writes touched, so their replay writes them whatever the
        state said (a row reverted meanwhile would otherwise be skipped and the sink kept
        the uncommitted write). A chunked record's state is kept instead, with every point
        it may have in the sink now (those it had, and the new ones the batch was writing)
        marked unknown: its replay rewrites the chunks it has and deletes the others.
        Returns how many records are redone."""
        j, t = s.inflight, s.record_state

        def redo(conn: Connection) -> int:
            pairs: set[tuple[str, str]] = set()
            written: dict[tuple[str, str], set[str]] = {}
            for (records,) in conn.execute(select(j.c.records).where(j.c.source == source)):
                for entry in orjson.loads(records):
                    pairs.add((entry[0], entry[1]))
                    if len(entry) > 2:
                        written.setdefault((entry[0], entry[1]), set()).update(entry[2])
            for mapping, keys in _group(sorted(pairs - set(written))).items():
                for i in range(0, len(keys), _CHUNK):
                    part = keys[i : i + _CHUNK]
                    conn.execute(delete(t).where(t.c.mapping == mapping, t.c.key.in_(part)))
            for (mapping, key), pids in written.items():
                _mark_unknown(conn, mapping, key, pids)
            conn.execute(delete(j).where(j.c.source == source))
            return len(pairs)

        return await self._tx("redo in-flight batches", redo)

    async def dependents(
        self, mapping: str, relation: str, related_keys: Sequence[str]
    ) -> list[Key]:
        """Keys (as the source types them) of ``mapping`` last built from any of
        ``related_keys`` of ``relation``."""
        d = s.record_deps

        def read(conn: Connection) -> list[Key]:
            found: list[Key] = []
            for i in range(0, len(related_keys), _CHUNK):
                query = select(d.c.native_key).where(
                    d.c.mapping == mapping,
                    d.c.relation == relation,
                    d.c.related_key.in_(list(related_keys[i : i + _CHUNK])),
                )
                found.extend(orjson.loads(k) for (k,) in conn.execute(query))
            return found

        return await self._tx("read record dependencies", read)

    async def forget(self, mapping: str, keys: Sequence[str]) -> None:
        """Drop record state, so the next sync of those keys writes them in full (repair)."""
        t = s.record_state

        def write(conn: Connection) -> None:
            for i in range(0, len(keys), _CHUNK):
                conn.execute(
                    delete(t).where(t.c.mapping == mapping, t.c.key.in_(list(keys[i : i + _CHUNK])))
                )

        await self._tx("forget record state", write)

    async def save_check(self, row: Mapping[str, Any]) -> int:
        def write(conn: Connection) -> int:
            values = {
                **row,
                "counts": orjson.dumps(row["counts"]).decode(),
                "report": dumps(row["report"]).decode(),
            }
            key = conn.execute(s.checks.insert().values(**values)).inserted_primary_key
            assert key is not None
            return int(key[0])

        return await self._tx("save check", write)

    async def checks(self, *, limit: int = 20) -> list[dict[str, Any]]:
        t = s.checks

        def read(conn: Connection) -> list[dict[str, Any]]:
            rows = conn.execute(select(t).order_by(t.c.id.desc()).limit(limit))
            return [
                {**r._mapping, "counts": orjson.loads(r.counts), "report": orjson.loads(r.report)}
                for r in rows
            ]

        return await self._tx("read checks", read)

    async def schema_versions(self, mapping: str) -> list[dict[str, Any]]:
        """Every registered version of a mapping's definition, oldest first."""
        t = s.schema_registry

        def read(conn: Connection) -> list[dict[str, Any]]:
            rows = conn.execute(select(t).where(t.c.mapping == mapping).order_by(t.c.version))
            return [{**r._mapping, "definition": orjson.loads(r.definition)} for r in rows]

        return await self._tx("read schema registry", read)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """One migrator at a time on a SQLite file (its DDL does not run in one transaction
    that would serialise two processes creating the schema at once)."""
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _stream_position(conn: Connection, source: str, epoch: str | None) -> int:
    p = s.positions
    row = conn.execute(
        select(p.c.position, p.c.position_data).where(
            p.c.source == source, p.c.stream == "", p.c.marker_type == "stream"
        )
    ).first()
    if row is None:
        return 0
    stored_epoch = row[1]  # None: stored before epochs existed, valid for any
    if epoch is not None and stored_epoch is not None and stored_epoch != epoch:
        return 0
    return int(row[0])


def _marker_query(source: str, table: str, kind: str, column: Any) -> Any:
    p = s.positions
    return select(column).where(p.c.source == source, p.c.stream == table, p.c.marker_type == kind)


def _mark_unknown(conn: Connection, mapping: str, key: str, written: set[str]) -> None:
    """A chunked record whose sink points are unknown after a crash: its state lists every
    point it may have (hashes emptied), so the next sync rewrites or deletes each."""
    t = s.record_state
    row = conn.execute(_STATES, {"mapping": mapping, "keys": [key]}).first()
    had = [] if row is None else [c[0] for c in orjson.loads(row.chunks or "[]")]
    pids = list(dict.fromkeys([*had, *sorted(written)]))
    refs = orjson.dumps([[pid, "", 0, 0] for pid in pids]).decode()
    if row is not None:
        conn.execute(
            t.update()
            .where(t.c.mapping == mapping, t.c.key == key)
            .values(text_hash="", payload_hash="", chunks=refs, points=len(pids))
        )
        return
    conn.execute(
        t.insert().values(
            mapping=mapping,
            key=key,
            point_id="",
            text_hash="",
            payload_hash="",
            source_version=0,
            schema_version="",
            synced_at=time.time(),
            payload="{}",
            bucket=key_bucket(key),
            digest_hi=0,
            digest_lo=0,
            chunks=refs,
            points=len(pids),
        )
    )


def _upsert_rows(
    conn: Connection,
    table: Table,
    columns: Sequence[str],
    keys: Sequence[str],
    rows: list[tuple[Any, ...]],
    *,
    add: Sequence[str] = (),
) -> None:
    """Insert or update ``rows`` (values in ``columns`` order) in one driver-level
    ``executemany``: SQLAlchemy's compiled insert costs ~10 µs a row in parameter
    processing, the driver's own loop a fraction of it (bench/bench_pipeline.py). The
    ``add`` columns of a row already there are added to, not replaced."""
    if not rows:
        return
    sql = _upsert_sql(conn.dialect.name, table.name, tuple(columns), tuple(keys), tuple(add))
    conn.exec_driver_sql(sql, rows)


@functools.cache
def _upsert_sql(
    dialect: str, table: str, columns: tuple[str, ...], keys: tuple[str, ...], add: tuple[str, ...]
) -> str:
    mark = "%s" if dialect == "postgresql" else "?"
    names = ", ".join(f'"{c}"' for c in columns)
    marks = ", ".join(mark for _ in columns)
    update = ", ".join(
        f'"{c}" = "{table}"."{c}" + excluded."{c}"' if c in add else f'"{c}" = excluded."{c}"'
        for c in columns
        if c not in keys
    )
    conflict = ", ".join(f'"{k}"' for k in keys)
    action = f"DO UPDATE SET {update}" if update else "DO NOTHING"
    return f'INSERT INTO "{table}" ({names}) VALUES ({marks}) ON CONFLICT ({conflict}) {action}'


@functools.cache
def _states_sql(dialect: str, keys: int) -> str:
    mark = "%s" if dialect == "postgresql" else "?"
    names = ", ".join(f'"{c}"' for c in _STATE_COLUMNS)
    marks = ", ".join(mark for _ in range(keys))
    return f'SELECT {names} FROM "record_state" WHERE "mapping" = {mark} AND "key" IN ({marks})'


def _record_state(row: Any) -> RecordState:
    mapping, key, pid, text_hash, payload_hash, version, schema, synced_at, payload = row[:9]
    hi, lo = row[10], row[11]
    return RecordState(
        mapping=mapping,
        key=key,
        point_id=pid,
        text_hash=text_hash,
        payload_hash=payload_hash,
        source_version=version,
        schema_version=schema,
        synced_at=synced_at,
        payload=orjson.loads(payload),
        row_digest=(hi << 31) | lo,
        chunks=None if row[12] is None else tuple(tuple(c) for c in orjson.loads(row[12])),
    )


def _group(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for mapping, key in pairs:
        grouped.setdefault(mapping, []).append(key)
    return grouped


def _evolution(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """What kind of change turned ``old`` into ``new`` (the most consequential one)."""
    if any(old.get(k) != new.get(k) for k in ("model", "dimension", "distance")):
        return "model_change"
    if old.get("text") != new.get("text"):
        return "template_change"
    old_cols, new_cols = old.get("columns", {}), new.get("columns", {})
    if any(old_cols[c] != new_cols[c] for c in set(old_cols) & set(new_cols)):
        return "type_change"
    if set(new_cols) - set(old_cols):
        return "add_column"
    if set(old_cols) - set(new_cols):
        return "drop_column"
    return "payload_change"
