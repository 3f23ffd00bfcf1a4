"""Logical replication capture: a slot and a publication named by vectorsync, streamed
with pgoutput through psycopg2's replication connection (psycopg 3 has no replication API).

A reader thread decodes the stream into committed transactions and buffers them; the
worker reads whole transactions (positions are commit end LSNs). The flush position sent
back to the server is only ever what the worker acknowledged, which it does after the
batch's sink writes and state commit are durable. When everything delivered has been
acknowledged, markers (heartbeats, fences, empty transactions) advance the flush position
too, so an idle publication never pins WAL. After a server restart the slot replays from
its last confirmed position; the worker absorbs the repeats (positions it has applied).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import select
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson
import psycopg
from psycopg import sql

from ..errors import ConfigError, SourceError
from ..model import Change, Key
from .base import Backlog, TableSpec
from .pgoutput import MESSAGE_PREFIX, Decoder, Transaction
from .postgres import redact, split_table, table_ident, wrap_errors

if TYPE_CHECKING:
    from .postgres import PostgresSource

__all__ = ["LogicalCapture", "format_lsn", "parse_lsn"]

logger = logging.getLogger(__name__)

BUFFER_CHANGES = 200_000  # decoded, unacknowledged changes held before reading pauses
FENCE_DEADLINE = 60.0


def parse_lsn(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


class LogicalCapture:
    def __init__(self, source: PostgresSource) -> None:
        self.source = source
        self.slot = source.slot
        self.publication = source.slot
        self._keys: dict[str, str] = {}
        self._stream: _Stream | None = None

    # -- installation -----------------------------------------------------------------------
    async def install(self, source: PostgresSource, tables: Sequence[TableSpec]) -> list[str]:
        for spec in tables:
            await source.check_table(spec, needs_identity=True)
        self._keys = {s.table: s.key for s in tables}
        await source.ensure_schema()
        async with source.session() as conn:
            with wrap_errors("install the publication"):
                await source.check_owner(conn)
                listed = sql.SQL(", ").join(table_ident(s.table) for s in tables)
                pub = sql.Identifier(self.publication)
                cur = await conn.execute(
                    "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
                    (self.publication,),
                )
                published = {(r[0], r[1]) for r in await cur.fetchall()}
                exists = await (
                    await conn.execute(
                        "SELECT 1 FROM pg_publication WHERE pubname = %s", (self.publication,)
                    )
                ).fetchone()
                if not exists:
                    await conn.execute(
                        sql.SQL("CREATE PUBLICATION {p} FOR TABLE {t}").format(p=pub, t=listed)
                    )
                elif published != {split_table(s.table) for s in tables}:
                    await conn.execute(
                        sql.SQL("ALTER PUBLICATION {p} SET TABLE {t}").format(p=pub, t=listed)
                    )
                slot = await self._slot_database(conn)
                if slot is None:  # installed anew: a new epoch, before the slot exists
                    await source.renew_epoch(conn, "logical")
                else:  # a slot made before epochs existed gets one now
                    await source.renew_epoch(conn, "logical", keep=True)
        if slot is None:
            await source.forget_snapshots()
            return await self._create_slot_and_snapshot(source, tables)
        pending = await source.pending_snapshots(tables)
        for spec in tables:
            if spec.table in pending:  # resumed (or a newly mapped table): current rows
                await source.snapshot_table(spec, pending[spec.table])
        return sorted(pending)

    async def _slot_database(self, conn: psycopg.AsyncConnection[Any]) -> str | None:
        """The database of the slot named ours (``None``: there is none); slot names are
        per server, so another database's slot of that name is refused."""
        row = await (
            await conn.execute(
                "SELECT database, database = current_database() FROM pg_replication_slots "
                "WHERE slot_name = %s",
                (self.slot,),
            )
        ).fetchone()
        if row is not None and not row[1]:
            raise ConfigError(
                f"source {self.source.name!r}: replication slot {self.slot!r} belongs to "
                f"database {row[0]!r} on this server; give this source its own slot name "
                '(slot = "..." in its [sources] section)'
            )
        return None if row is None else str(row[0])

    async def _create_slot_and_snapshot(
        self, source: PostgresSource, tables: Sequence[TableSpec]
    ) -> list[str]:
        """Create the slot, then read existing keys at its consistent point: every change
        after that point is in the stream, every row before it is in the snapshot."""
        import psycopg2
        import psycopg2.extensions
        import psycopg2.extras

        def create() -> tuple[Any, str, str]:
            try:
                conn = psycopg2.connect(
                    source.url, connection_factory=psycopg2.extras.LogicalReplicationConnection
                )
                cur = conn.cursor()
                slot = psycopg2.extensions.quote_ident(self.slot, conn)
                cur.execute(f"CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput EXPORT_SNAPSHOT")
                _, consistent, snapshot, _ = cur.fetchone()
            except psycopg2.Error as exc:
                raise SourceError(
                    f"source {source.name!r}: cannot create replication slot {self.slot!r} "
                    f"at {redact(source.url)}: {exc}".strip()
                ) from exc
            return conn, str(consistent), str(snapshot)

        repl, consistent, snapshot = await asyncio.to_thread(create)
        logger.info(
            "replication slot %s created at %s",
            self.slot,
            consistent,
            extra={"action": "source_setup", "source": source.name},
        )
        try:
            reader = await source.connect()
            try:
                with wrap_errors("open the exported snapshot"):
                    await reader.set_autocommit(False)
                    await reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    await reader.execute(
                        sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot))
                    )
                for spec in tables:
                    await source.snapshot_table(spec, None, reader)
            finally:
                await reader.close()
        finally:
            await asyncio.to_thread(repl.close)
        return sorted(s.table for s in tables)

    async def teardown(self) -> None:
        await self.close()
        async with self.source.session() as conn:
            with wrap_errors("remove the slot and publication"):
                deadline = time.monotonic() + 30
                while True:
                    row = await (
                        await conn.execute(
                            "SELECT active_pid FROM pg_replication_slots "
                            "WHERE slot_name = %s AND database = current_database()",
                            (self.slot,),
                        )
                    ).fetchone()
                    if row is None:
                        break
                    if row[0] is None:
                        await conn.execute("SELECT pg_drop_replication_slot(%s)", (self.slot,))
                        break
                    if time.monotonic() > deadline:
                        raise SourceError(
                            f"source {self.source.name!r}: slot {self.slot!r} is still in use "
                            f"by process {row[0]}; stop the vectorsync using it and retry"
                        )
                    # another vectorsync streams from it: stop that stream, then drop
                    await conn.execute("SELECT pg_terminate_backend(%s)", (row[0],))
                    await asyncio.sleep(0.1)
                await conn.execute(
                    sql.SQL("DROP PUBLICATION IF EXISTS {p}").format(
                        p=sql.Identifier(self.publication)
                    )
                )
                await self.source.forget_epoch(conn)
        await self.source.forget_snapshots()

    async def epoch(self) -> str:
        installed = sql.SQL(
            "EXISTS (SELECT 1 FROM pg_replication_slots "
            "WHERE slot_name = {s} AND database = current_database())"
        ).format(s=sql.Literal(self.slot))
        return await self.source.read_epoch("logical", installed)

    # -- the feed ---------------------------------------------------------------------------
    async def write_keys(
        self, conn: psycopg.AsyncConnection[Any], table: str, keys: Sequence[Key], op: str
    ) -> None:
        body = orjson.dumps({"slot": self.slot, "table": table, "op": op, "keys": list(keys)})
        await conn.execute(
            "SELECT pg_logical_emit_message(true, %s, %s::bytea)", (MESSAGE_PREFIX, body)
        )

    async def head(self) -> int:
        """The position of the newest transaction committed before this call. A fence
        message is written and the stream read up to it; in a process that is not
        streaming (``status``) the server's current WAL position is shown instead."""
        if not self._keys:
            async with self.source.session() as conn:
                with wrap_errors("read the WAL position"):
                    row = await (await conn.execute("SELECT pg_current_wal_lsn()::text")).fetchone()
            return parse_lsn(row[0]) if row else 0
        stream = self._live()
        async with self.source.session() as conn:
            with wrap_errors("write a fence"):  # transactional: its commit flushes the WAL
                row = await (
                    await conn.execute(
                        "SELECT pg_logical_emit_message(true, %s, %s)::text",
                        (f"{MESSAGE_PREFIX}-fence", self.slot),
                    )
                ).fetchone()
        assert row is not None
        fence = parse_lsn(row[0])
        deadline = time.monotonic() + FENCE_DEADLINE
        while stream.seen < fence:
            if time.monotonic() > deadline:
                raise SourceError(
                    f"source {self.source.name!r}: the replication stream did not reach "
                    f"{format_lsn(fence)} within {FENCE_DEADLINE:g}s"
                )
            await stream.wait(0.5)
            stream = self._live()
        return stream.newest

    def _live(self) -> _Stream:
        stream = self._stream
        if stream is not None and stream.error is not None:
            error, self._stream = stream.error, None
            stream.stop()
            raise SourceError(
                f"source {self.source.name!r}: replication stream of slot {self.slot!r} "
                f"broke: {error}".strip()
            ) from error
        if stream is None:
            if not self._keys:
                raise SourceError(f"source {self.source.name!r}: capture is not set up")
            stream = _Stream(self, asyncio.get_running_loop())
            stream.start()
            self._stream = stream
        return stream

    async def read_changes(self, after: int, limit: int) -> list[Change]:
        return self._live().take(after, limit)

    async def wait(self, timeout: float) -> None:
        await self._live().wait(timeout)

    async def ack(self, position: int) -> None:
        if self._stream is not None:
            self._stream.ack(position)

    async def backlog(self, after: int) -> Backlog:
        async with self.source.session() as conn:
            with wrap_errors("read slot lag"):
                row = await (
                    await conn.execute(
                        "SELECT (pg_current_wal_lsn() - s.confirmed_flush_lsn)::bigint, "
                        "extract(epoch FROM r.flush_lag)::float8 FROM pg_replication_slots s "
                        "LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid "
                        "WHERE s.slot_name = %s",
                        (self.slot,),
                    )
                ).fetchone()
            lag_bytes = int(row[0]) if row and row[0] is not None else None
            pending, oldest = (0, None) if self._stream is None else self._stream.pending(after)
            if oldest is None and row and row[1] is not None:
                oldest = time.time() - float(row[1])
        return Backlog(changes=pending, oldest_committed_at=oldest, lag_bytes=lag_bytes)

    async def close(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await asyncio.to_thread(stream.stop)


class _Stream:
    """The reader thread: decodes the replication stream into a buffer of transactions."""

    def __init__(self, capture: LogicalCapture, loop: asyncio.AbstractEventLoop) -> None:
        self.capture = capture
        self.loop = loop
        self.error: BaseException | None = None
        self.seen = 0  # newest LSN read from the stream (commits and markers)
        self.newest = 0  # position of the newest transaction with changes
        self._lock = threading.Lock()
        self._positions: list[int] = []
        self._txns: list[Transaction] = []
        self._buffered = 0
        self._acked = 0
        self._sent = 0
        self._stop = threading.Event()
        self._arrived = asyncio.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"pgoutput-{capture.slot}", daemon=True
        )
        self.decoder = Decoder(dict(capture._keys), capture.slot, self._on_txn, self._on_marker)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    # -- called from the event loop ---------------------------------------------------------
    def take(self, after: int, limit: int) -> list[Change]:
        """Whole transactions committed after ``after``, at least ``limit`` changes if
        that many are buffered (a transaction is never split: its position is one LSN)."""
        out: list[Change] = []
        with self._lock:
            i = bisect.bisect_right(self._positions, after)
            while i < len(self._txns) and len(out) < limit:
                out.extend(self._txns[i].changes)
                i += 1
            self._arrived.clear()
        return out

    async def wait(self, timeout: float) -> None:
        if self.error is not None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._arrived.wait(), timeout)

    def ack(self, position: int) -> None:
        with self._lock:
            self._acked = max(self._acked, position)
            i = bisect.bisect_right(self._positions, position)
            self._buffered -= sum(len(t.changes) for t in self._txns[:i])
            del self._positions[:i], self._txns[:i]

    def pending(self, after: int) -> tuple[int, float | None]:
        with self._lock:
            i = bisect.bisect_right(self._positions, after)
            txns = self._txns[i:]
            return sum(len(t.changes) for t in txns), (txns[0].committed_at if txns else None)

    # -- called from the reader thread ------------------------------------------------------
    def _on_txn(self, txn: Transaction) -> None:
        self.seen = max(self.seen, txn.position)
        if not txn.changes:
            return
        self.newest = max(self.newest, txn.position)
        with self._lock:
            self._positions.append(txn.position)
            self._txns.append(txn)
            self._buffered += len(txn.changes)
        self.loop.call_soon_threadsafe(self._arrived.set)

    def _on_marker(self, lsn: int, _: str) -> None:
        self.seen = max(self.seen, lsn)
        self.loop.call_soon_threadsafe(self._arrived.set)

    def _flush_target(self) -> int:
        """What may be confirmed: the acknowledged position, or everything read so far
        once nothing delivered is still unacknowledged."""
        with self._lock:
            return self.seen if not self._txns else self._acked

    def _run(self) -> None:
        import psycopg2
        import psycopg2.extras

        source = self.capture.source
        conn = None
        try:
            conn = psycopg2.connect(
                source.url, connection_factory=psycopg2.extras.LogicalReplicationConnection
            )
            cur = conn.cursor()
            cur.start_replication(
                slot_name=self.capture.slot,
                decode=False,
                options={
                    "proto_version": "1",
                    "publication_names": self.capture.publication,
                    "messages": "true",
                },
                status_interval=5,
            )
            heartbeat = _Heartbeat(source.url, self.capture.slot, source.heartbeat_interval)
            try:
                while not self._stop.is_set():
                    target = self._flush_target()
                    if target > self._sent:
                        cur.send_feedback(flush_lsn=target, force=True)
                        self._sent = target
                    if self._buffered >= BUFFER_CHANGES:  # let the worker catch up
                        cur.send_feedback()  # keeps the sender's timeout at bay
                        self._stop.wait(0.05)
                        continue
                    msg = cur.read_message()
                    if msg is not None:
                        self.decoder.feed(msg.payload)
                        continue
                    heartbeat.beat()
                    select.select([cur], [], [], 0.2)
            finally:
                heartbeat.close()
        except BaseException as exc:
            self.error = exc
            self.loop.call_soon_threadsafe(self._arrived.set)
        finally:
            if conn is not None:
                try:
                    conn.close()
                except Exception:
                    logger.debug("closing the replication connection failed", exc_info=True)


class _Heartbeat:
    """A tiny transaction (a logical message) every ``interval`` seconds: it flows through
    the slot even when no published table changes, so the confirmed position keeps moving."""

    def __init__(self, url: str, slot: str, interval: float) -> None:
        self.url = url
        self.slot = slot
        self.interval = interval
        self._next = time.monotonic() + interval
        self._conn: psycopg.Connection[Any] | None = None

    def beat(self) -> None:
        if time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.interval
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self.url, autocommit=True)
            self._conn.execute(  # transactional: its commit flushes the WAL
                "SELECT pg_logical_emit_message(true, %s, %s)",
                (f"{MESSAGE_PREFIX}-heartbeat", self.slot),
            )
        except psycopg.Error as exc:  # the stream itself reports a real outage
            logger.debug("heartbeat failed: %s", exc)
            self.close()

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None
