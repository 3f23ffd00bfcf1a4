"""The journaled write API: an application writes a source through vectorsync and learns
when its write is searchable.

``async with engine.writer("app", consistency="strong") as w: await w.upsert(...)``

Each write (or each ``transaction()``) goes: before-images read from the source → journal
entries in the state store (``write_journal``) → the source written in one transaction
(its change capture, committed with the rows, carries the change to the sinks) → for
``strong``, ``Engine.wait_for`` the source's head, then the dead-letter queue looked at
for the keys written → the journal entries removed.

Recovery (``recover``, at writer open and at the start of every run) looks at each
journaled transaction left by a dead process: when the source holds its writes, the
source write happened and its change capture carries it to the sinks like any other
change — the entry is removed. When the source does not hold them, the source write never
committed and the caller never got an answer: the entry is *dropped*, not re-applied,
because the caller did not learn of success and a write re-applied later could overwrite
a newer row some other writer committed in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

from . import _failpoints
from ._blocking import BlockingLane
from .errors import ConfigError, PermanentError
from .events import Compensated, Written
from .state.journal import Entry

if TYPE_CHECKING:
    from .config import MappingConfig
    from .engine import Engine

__all__ = ["Compensate", "Consistency", "WriteRejected", "Writer", "recover"]

logger = logging.getLogger(__name__)

Consistency = Literal["strong", "eventual"]
Compensate = Literal["dead_letter", "undo"]


class WriteRejected(PermanentError):
    """A sink refused a written record for good; the source row was restored
    (``compensate="undo"``)."""

    def __init__(self, message: str, *, sinks: tuple[str, ...], reason: str) -> None:
        super().__init__(message)
        self.sinks = sinks
        self.reason = reason


class _Backend(Protocol):
    async def before(self, table: str, key_col: str, key: Any) -> dict[str, Any] | None: ...

    async def apply(self, writes: Sequence[tuple[str, str, Entry]]) -> None:
        """(table, key column, entry) written in one source transaction."""

    async def close(self) -> None: ...


def _upsert_parts(row: dict[str, Any], key_col: str) -> tuple[list[str], list[str]]:
    cols = list(row)
    if key_col not in row:
        raise ConfigError(f"the row written has no value for the key column {key_col!r}")
    return cols, [c for c in cols if c != key_col]


class _SqliteBackend:
    def __init__(self, path: Any) -> None:
        self._lane = BlockingLane("writer-sqlite")
        self._path = path
        self._db: sqlite3.Connection | None = None

    async def open(self) -> None:
        def connect() -> None:
            self._db = sqlite3.connect(
                self._path, timeout=30, isolation_level=None, check_same_thread=False
            )
            self._db.row_factory = sqlite3.Row

        await self._lane.run(connect)

    async def close(self) -> None:
        if self._db is not None:
            await self._lane.run(self._db.close)
        self._lane.shutdown()

    async def before(self, table: str, key_col: str, key: Any) -> dict[str, Any] | None:
        from .sources.sqlite import _quote

        def read() -> dict[str, Any] | None:
            assert self._db is not None
            row = self._db.execute(
                f"SELECT * FROM {_quote(table)} WHERE {_quote(key_col)} = ?", (key,)
            ).fetchone()
            return None if row is None else dict(row)

        return await self._lane.run(read)

    async def apply(self, writes: Sequence[tuple[str, str, Entry]]) -> None:
        from .sources.sqlite import _quote

        def write() -> None:
            assert self._db is not None
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                for table, key_col, e in writes:
                    t, k = _quote(table), _quote(key_col)
                    if e.row is None:
                        db.execute(f"DELETE FROM {t} WHERE {k} = ?", (e.key,))
                        continue
                    cols, rest = _upsert_parts(e.row, key_col)
                    sets = ", ".join(f"{_quote(c)} = excluded.{_quote(c)}" for c in rest)
                    db.execute(
                        f"INSERT INTO {t} ({', '.join(map(_quote, cols))}) "
                        f"VALUES ({', '.join('?' for _ in cols)}) ON CONFLICT ({k}) "
                        + (f"DO UPDATE SET {sets}" if sets else "DO NOTHING"),
                        [e.row[c] for c in cols],
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        await self._lane.run(write)


class _PostgresBackend:
    def __init__(self, source: Any) -> None:
        self._source = source
        self._conn: Any = None

    async def open(self) -> None:
        self._conn = await self._source.connect()

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def before(self, table: str, key_col: str, key: Any) -> dict[str, Any] | None:
        from psycopg import sql
        from psycopg.rows import dict_row

        from .sources.postgres import plain, table_ident

        query = sql.SQL("SELECT * FROM {t} WHERE {k} = %s").format(
            t=table_ident(table), k=sql.Identifier(key_col)
        )
        async with self._conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query, (key,))
            row = await cur.fetchone()
        return None if row is None else {c: plain(v) for c, v in row.items()}

    async def apply(self, writes: Sequence[tuple[str, str, Entry]]) -> None:
        from psycopg import sql

        from .sources.postgres import table_ident

        async with self._conn.transaction():
            for table, key_col, e in writes:
                t, k = table_ident(table), sql.Identifier(key_col)
                if e.row is None:
                    query = sql.SQL("DELETE FROM {t} WHERE {k} = %s").format(t=t, k=k)
                    await self._conn.execute(query, (e.key,))
                    continue
                cols, rest = _upsert_parts(e.row, key_col)
                action = (
                    sql.SQL("DO UPDATE SET {s}").format(
                        s=sql.SQL(", ").join(
                            sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in rest
                        )
                    )
                    if rest
                    else sql.SQL("DO NOTHING")
                )
                query = sql.SQL(
                    "INSERT INTO {t} ({cs}) VALUES ({vs}) ON CONFLICT ({k}) {a}"
                ).format(
                    t=t,
                    cs=sql.SQL(", ").join(map(sql.Identifier, cols)),
                    vs=sql.SQL(", ").join(sql.Placeholder() for _ in cols),
                    k=k,
                    a=action,
                )
                await self._conn.execute(query, [e.row[c] for c in cols])


class _SurrealBackend:
    """Writes through the source's own connection (an embedded file is open once per
    process) with the statements the source module shares with its tests."""

    def __init__(self, source: Any) -> None:
        self._source = source

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def before(self, table: str, key_col: str, key: Any) -> dict[str, Any] | None:
        found: dict[Any, dict[str, Any]] = await self._source.fetch(table, key_col, [key])
        return found.get(key)

    async def apply(self, writes: Sequence[tuple[str, str, Entry]]) -> None:
        from .sources.surrealdb import delete_statement, upsert_statement

        statements, params = [], {}
        for i, (table, key_col, e) in enumerate(writes):
            if e.row is None:
                text, values = delete_statement(table, e.key)
            else:
                text, values = upsert_statement(table, {**e.row, "id": e.row[key_col]})
            for name in sorted(values, key=len, reverse=True):  # $t before a $t2 could clash
                text = text.replace(f"${name}", f"$w{i}_{name}")
            statements.append(text)
            params.update({f"w{i}_{n}": v for n, v in values.items()})
        await self._source.query(
            "BEGIN TRANSACTION; " + "; ".join(statements) + "; COMMIT TRANSACTION;", params
        )


class _GraphBackend:
    """Writes a FalkorDB graph (outbox capture) through ``GraphWriter``: nodes and their
    outbox entries in one MULTI/EXEC."""

    def __init__(self, source: Any) -> None:
        self._source = source
        self._graph: Any = None

    async def open(self) -> None:
        from .graph import GraphWriter

        self._graph = GraphWriter(self._source.url, self._source.graph_name)

    async def close(self) -> None:
        if self._graph is not None:
            self._graph.close()

    async def before(self, table: str, key_col: str, key: Any) -> dict[str, Any] | None:
        found: dict[Any, dict[str, Any]] = await self._source.fetch(table, key_col, [key])
        return found.get(key)

    async def apply(self, writes: Sequence[tuple[str, str, Entry]]) -> None:
        graph = self._graph
        graph.keys.update({table: key_col for table, key_col, _ in writes})

        def write() -> None:
            with graph.transaction():
                for table, _, e in writes:
                    if e.row is None:
                        graph.delete_node(table, e.key)
                    else:
                        graph.upsert_node(table, e.row)

        await asyncio.to_thread(write)


async def _backend(engine: Engine, source: str) -> _Backend:
    from .sources.falkordb import FalkorDBSource
    from .sources.postgres import PostgresSource
    from .sources.sqlite import SqliteSource
    from .sources.surrealdb import SurrealDBSource

    src = engine.sources[source]
    backend: _SqliteBackend | _PostgresBackend | _SurrealBackend | _GraphBackend
    if isinstance(src, SqliteSource):
        backend = _SqliteBackend(src.path)
    elif isinstance(src, PostgresSource):
        backend = _PostgresBackend(src)
    elif isinstance(src, SurrealDBSource):
        backend = _SurrealBackend(src)
    elif isinstance(src, FalkorDBSource) and src.capture == "outbox":
        backend = _GraphBackend(src)
    else:
        raise ConfigError(
            f"source {source!r}: the write API writes SQLite, PostgreSQL, SurrealDB and "
            f"FalkorDB (outbox capture) sources (this one is {type(src).__name__})"
        )
    await backend.open()
    return backend


def _holds(entry: Entry, now: dict[str, Any] | None) -> bool:
    """Whether the source row shows the journaled write."""
    if entry.row is None:
        return now is None
    return now is not None and all(now.get(c) == v for c, v in entry.row.items())


class Writer:
    """Writes one source through the journal; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        source: str,
        backend: _Backend,
        *,
        consistency: Consistency,
        compensate: Compensate,
        timeout: float,
    ) -> None:
        self.engine = engine
        self.source = source
        self.consistency = consistency
        self.compensate = compensate
        self.timeout = timeout
        self._backend = backend
        self._pending: list[tuple[str, Any, dict[str, Any] | None]] | None = None

    def _mappings(self, table: str) -> list[MappingConfig]:
        found = [
            m for m in self.engine.config.mappings if m.source == self.source and m.table == table
        ]
        if not found:
            raise ConfigError(f"source {self.source!r}: no mapping syncs table {table!r}")
        return found

    async def upsert(self, table: str, row: dict[str, Any]) -> None:
        """Insert or update one row (by the mapping's key column)."""
        key_col = self._mappings(table)[0].key
        if key_col not in row:
            raise ConfigError(f"table {table!r}: the row has no key column {key_col!r}")
        await self._write(table, row[key_col], dict(row))

    async def delete(self, table: str, key: Any) -> None:
        await self._write(table, key, None)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """The writes inside commit together at the source, when the block exits."""
        if self._pending is not None:
            raise RuntimeError("transactions of a writer do not nest")
        self._pending = []
        try:
            yield
            writes, self._pending = self._pending, None
            if writes:
                await self._commit(writes)
        finally:
            self._pending = None

    async def _write(self, table: str, key: Any, row: dict[str, Any] | None) -> None:
        if self._pending is not None:
            self._pending.append((table, key, row))
        else:
            await self._commit([(table, key, row)])

    async def _commit(self, writes: list[tuple[str, Any, dict[str, Any] | None]]) -> None:
        txn = uuid.uuid4().hex
        started = time.time()
        entries, keyed = [], []
        for table, key, row in writes:
            key_col = self._mappings(table)[0].key
            before = await self._backend.before(table, key_col, key)
            entry = Entry(
                source=self.source,
                txn=txn,
                table=table,
                key=key,
                op="delete" if row is None else "upsert",
                row=row,
                before=before,
                holder=self.engine.instance_id,
                host=socket.gethostname(),
                pid=os.getpid(),
            )
            entries.append(entry)
            keyed.append((table, key_col, entry))
        await self.engine.state.journal_writes(entries)
        refused: dict[tuple[str, str], list[str]] = {}
        try:
            _failpoints.hit("writer_after_journal")
            await self._backend.apply(keyed)
            _failpoints.hit("writer_after_source")
            if self.consistency == "strong":
                refused = await self._through(entries, started)
            if refused and self.compensate == "undo":
                await self._undo(keyed, refused)
        finally:
            # Done with, however it ended in this (live) process: a source that refused the
            # write holds nothing of it; one that committed it has its change capture carry
            # it to the sinks, also when waiting for them timed out.
            await self.engine.state.unjournal(txn)
        for e in entries:
            self.engine.emit(
                Written(
                    source=self.source,
                    table=e.table,
                    key=e.key,
                    op=e.op,
                    consistency=self.consistency,
                    dead_lettered=any(t == e.table and k == str(e.key) for t, k in refused),
                )
            )

    async def _wait(self) -> None:
        position = await self.engine.head(self.source)
        await self.engine.wait_for(position, source=self.source, timeout=self.timeout)

    async def _through(
        self, entries: Sequence[Entry], started: float
    ) -> dict[tuple[str, str], list[str]]:
        """Wait until every sink has the writes; the records dead-lettered on the way:
        (table, key) → "sink: reason" each."""
        await self._wait()
        refused: dict[tuple[str, str], list[str]] = {}
        letters = await self.engine.state.dead_letters(None)
        for m in {m.name: m for e in entries for m in self._mappings(e.table)}.values():
            keys = {str(e.key) for e in entries if e.table == m.table}
            sinks = m.sinks or (m.sink,)
            for letter in letters:
                copy = letter.mapping.removeprefix(m.name + ".")
                if letter.mapping != m.name and copy == letter.mapping:
                    continue  # another mapping's
                sink = sinks[0] if letter.mapping == m.name else copy
                if letter.key in keys and letter.updated_at >= started - 1.0:
                    refused.setdefault((m.table, letter.key), []).append(
                        f"{sink}: {letter.message}"
                    )
        return refused

    async def _undo(
        self,
        keyed: Sequence[tuple[str, str, Entry]],
        refused: dict[tuple[str, str], list[str]],
    ) -> None:
        """Restore every row of the transaction (it committed together, so it is undone
        together), wait for the sinks to have the restored rows, and raise."""
        restore = [(t, k, Entry(**{**_fields(e), "row": _restored(e)})) for t, k, e in keyed]
        await self._backend.apply(restore)
        await self._wait()
        reason = "; ".join(r for reasons in refused.values() for r in reasons)
        sinks = tuple(
            dict.fromkeys(r.split(":", 1)[0] for reasons in refused.values() for r in reasons)
        )
        for table, key in refused:
            self.engine.emit(
                Compensated(source=self.source, table=table, key=key, sinks=sinks, reason=reason)
            )
        logger.warning(
            "a sink rejected a write to %s: the source rows were restored",
            self.source,
            extra={"action": "writer_undo", "source": self.source, "count": len(restore)},
        )
        raise WriteRejected(
            f"sink {', '.join(map(repr, sinks))} rejected the write to source {self.source!r} "
            f"(keys {', '.join(k for _, k in refused)}): {reason}; the source rows were restored",
            sinks=sinks,
            reason=reason,
        )


def _dead(engine: Engine, e: Entry) -> bool:
    """Whether the writer of a journal entry is gone: not this engine, and its process
    dead on this host, or (another host) silent for longer than a lease lives."""
    if e.holder == engine.instance_id:
        return False
    if e.host == socket.gethostname():
        try:
            os.kill(e.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return time.time() - e.created_at > engine.lease_ttl


def _key_column(engine: Engine, source: str, table: str) -> str:
    for m in engine.config.mappings:
        if m.source == source and m.table == table:
            return m.key
    raise ConfigError(f"source {source!r}: no mapping syncs table {table!r}")


def _restored(e: Entry) -> dict[str, Any] | None:
    """The row to write back: the before-image, with columns the write set and the row did
    not have set to NULL (a graph node's property so set is removed)."""
    if e.before is None:
        return None
    return {**{c: None for c in e.row or {} if c not in e.before}, **e.before}


def _fields(e: Entry) -> dict[str, Any]:
    return {f: getattr(e, f) for f in Entry.__dataclass_fields__}


async def recover(engine: Engine, source: str, backend: _Backend | None = None) -> int:
    """Finish what a crash interrupted (see the module docstring); how many transactions."""
    txns: dict[str, list[Entry]] = {}
    for e in await engine.state.journaled(source):
        if not _dead(engine, e):
            continue  # a live writer's, in flight
        txns.setdefault(e.txn, []).append(e)
    if not txns:
        return 0
    own = backend is None
    backend = backend or await _backend(engine, source)
    try:
        for txn, entries in txns.items():
            held = []
            for e in entries:
                key_col = _key_column(engine, source, e.table)
                held.append(_holds(e, await backend.before(e.table, key_col, e.key)))
            logger.warning(
                "journaled write of %s left by a dead process: %s",
                source,
                "the source has it, the sync carries it" if all(held) else "dropped",
                extra={"action": "writer_recover", "source": source, "count": len(entries)},
            )
            await engine.state.unjournal(txn)
    finally:
        if own:
            await backend.close()
    return len(txns)


@contextlib.asynccontextmanager
async def open_writer(
    engine: Engine,
    source: str,
    *,
    consistency: Consistency = "strong",
    compensate: Compensate = "dead_letter",
    timeout: float = 30.0,
) -> AsyncIterator[Writer]:
    if consistency not in ("strong", "eventual"):
        raise ConfigError(f"consistency={consistency!r}: one of 'strong', 'eventual'")
    if compensate not in ("dead_letter", "undo"):
        raise ConfigError(f"compensate={compensate!r}: one of 'dead_letter', 'undo'")
    if source not in engine.sources:
        raise ConfigError(f"no source named {source!r} (sources: {', '.join(engine.sources)})")
    backend = await _backend(engine, source)
    try:
        await recover(engine, source, backend)
        yield Writer(
            engine,
            source,
            backend,
            consistency=consistency,
            compensate=compensate,
            timeout=timeout,
        )
    finally:
        await backend.close()
