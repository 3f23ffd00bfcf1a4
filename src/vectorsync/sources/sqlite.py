"""SQLite source: triggers feed an outbox table inside the source database.

SQLite has one writer at a time, so outbox sequence numbers are assigned in commit order
and a ``seq > position`` cursor is safe (unlike PostgreSQL outboxes). Installing the
triggers and enqueueing every existing key happen in one write transaction, so the
snapshot hands over to the stream with no gap and no loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import String
from sqlalchemy.dialects import sqlite as sqlite_dialect

from .._blocking import BlockingLane
from ..errors import ConfigError, PermanentError, SourceError
from ..model import Change, Key, decode_text
from ..related import RelatedRecord, Relation
from .base import Backlog, TableSpec

__all__ = ["OUTBOX", "SqliteSource"]

logger = logging.getLogger(__name__)

OUTBOX = "_vectorsync_outbox"
META = "_vectorsync_meta"  # the capture's epoch (see Source.epoch)
_DIALECT = sqlite_dialect.dialect()
_quote = _DIALECT.identifier_preparer.quote_identifier
_literal_processor = String().literal_processor(_DIALECT)  # type: ignore[no-untyped-call]
_FETCH_CHUNK = 500

_OUTBOX_DDL = f"""CREATE TABLE IF NOT EXISTS {OUTBOX} (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tbl TEXT NOT NULL,
    key,
    op TEXT NOT NULL,
    committed_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
)"""


_META_DDL = f"CREATE TABLE IF NOT EXISTS {META} (name TEXT PRIMARY KEY, value TEXT NOT NULL)"


def _literal(value: str) -> str:
    assert _literal_processor is not None
    return str(_literal_processor(value))


@contextlib.contextmanager
def wrap_errors(what: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.OperationalError as exc:
        code = getattr(exc, "sqlite_errorname", None)
        raise SourceError(f"sqlite source: {what}: {exc}", code=code) from exc
    except sqlite3.Error as exc:
        code = getattr(exc, "sqlite_errorname", None)
        raise PermanentError(f"sqlite source: {what}: {exc}", code=code) from exc


def trigger_sql(spec: TableSpec) -> dict[str, str]:
    """The three capture triggers of a table, by name, exactly as sqlite_master keeps them."""
    t, k, lit = _quote(spec.table), _quote(spec.key), _literal(spec.table)
    ins = f"INSERT INTO {OUTBOX}(tbl, key, op)"
    base = f"_vectorsync_{spec.table}"
    return {
        f"{base}_ins": f"CREATE TRIGGER {_quote(base + '_ins')} AFTER INSERT ON {t} BEGIN "
        f"{ins} VALUES ({lit}, NEW.{k}, 'insert'); END",
        f"{base}_upd": f"CREATE TRIGGER {_quote(base + '_upd')} AFTER UPDATE ON {t} BEGIN "
        f"{ins} SELECT {lit}, OLD.{k}, 'delete' WHERE OLD.{k} IS NOT NEW.{k}; "
        f"{ins} VALUES ({lit}, NEW.{k}, 'update'); END",
        f"{base}_del": f"CREATE TRIGGER {_quote(base + '_del')} AFTER DELETE ON {t} BEGIN "
        f"{ins} VALUES ({lit}, OLD.{k}, 'delete'); END",
    }


class SqliteSource:
    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self._lane = BlockingLane(f"sqlite-source-{name}")
        self._conn: sqlite3.Connection | None = None
        self._read_epoch = ""  # the epoch of the outbox the last changes were read from

    async def open(self) -> None:
        await self._lane.run(self._connect)

    async def close(self) -> None:
        if self._conn is not None:
            await self._lane.run(self._conn.close)
            self._conn = None
        self._lane.shutdown()

    def _connect(self) -> None:
        if not self.path.exists():
            raise ConfigError(
                f"source {self.name!r}: SQLite database {str(self.path)!r} does not exist; "
                "check sources.<name>.path"
            )
        with wrap_errors("connect"):
            self._conn = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False
            )
            self._conn.execute("PRAGMA busy_timeout = 30000")
            self._conn.text_factory = decode_text

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("source is not open")
        return self._conn

    async def columns(self, table: str) -> dict[str, str]:
        return await self._lane.run(self._columns, table)

    def _columns(self, table: str) -> dict[str, str]:
        with wrap_errors(f"describe {table!r}"):
            rows = self._db.execute(f"PRAGMA table_info({_quote(table)})").fetchall()
            if not rows:
                tables = [
                    r[0]
                    for r in self._db.execute(
                        "SELECT name FROM sqlite_master WHERE type = 'table' "
                        "AND name NOT LIKE '\\_vectorsync%' ESCAPE '\\' ORDER BY name"
                    )
                ]
                raise ConfigError(
                    f"source {self.name!r}: table {table!r} not found in {str(self.path)!r} "
                    f"(tables: {', '.join(tables) or 'none'})"
                )
        return {r[1]: (r[2] or "").upper() for r in rows}

    async def check_key(self, spec: TableSpec) -> None:
        await self._lane.run(self._check_key, spec)

    def _check_key(self, spec: TableSpec) -> None:
        where = f"source {self.name!r}: key {spec.key!r} of table {spec.table!r}"
        with wrap_errors(f"describe {spec.table!r}"):
            info = self._db.execute(f"PRAGMA table_info({_quote(spec.table)})").fetchall()
            declared = {r[1]: (r[2] or "").upper() for r in info}
            primary = [r[1] for r in sorted(info, key=lambda r: r[5]) if r[5]]
            unique = primary == [spec.key] or any(
                self._unique_on(index, spec.key)
                for _, index, is_unique, _, partial in self._db.execute(
                    f"PRAGMA index_list({_quote(spec.table)})"
                )
                if is_unique and not partial
            )
        kind = declared.get(spec.key, "")
        if not any(t in kind for t in ("INT", "CHAR", "CLOB", "TEXT")):
            raise ConfigError(
                f"{where} is declared {kind or 'without a type'}: SQLite then keeps 42 and '42' "
                "as two rows that would share one point; declare it INTEGER or TEXT"
            )
        if not unique:
            raise ConfigError(
                f"{where} is neither the primary key nor covered by a unique index: rows "
                "sharing a key would merge into one point; make it PRIMARY KEY or add "
                f"CREATE UNIQUE INDEX ON {spec.table} ({spec.key}), or map another key"
            )

    def _unique_on(self, index: str, column: str) -> bool:
        cols = [r[2] for r in self._db.execute(f"PRAGMA index_info({_quote(index)})")]
        return cols == [column]

    async def setup(self, tables: Sequence[TableSpec]) -> list[str]:
        return await self._lane.run(self._setup, list(tables))

    def _setup(self, tables: list[TableSpec]) -> list[str]:
        db = self._db
        try:  # WAL lets our reads run beside the app's writes; switching needs a moment alone
            db.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError as exc:
            logger.warning(
                "could not switch %s to WAL mode (%s); continuing in its current journal mode",
                self.path,
                exc,
                extra={"action": "source_setup"},
            )
        with wrap_errors("install capture"):
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(_OUTBOX_DDL)
                db.execute(_META_DDL)
                # a new outbox numbers from 1 again: a new epoch (kept if already there)
                db.execute(
                    f"INSERT OR IGNORE INTO {META}(name, value) VALUES ('epoch', ?)",
                    (uuid.uuid4().hex,),
                )
                existing = dict(
                    db.execute("SELECT name, sql FROM sqlite_master WHERE type='trigger'")
                )
                snapshotted = [spec.table for spec in tables if self._install(spec, existing)]
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return snapshotted

    def _install(self, spec: TableSpec, existing: dict[str, str]) -> bool:
        wanted = trigger_sql(spec)
        if all(existing.get(name) == sql for name, sql in wanted.items()):
            return False
        for name, sql in wanted.items():
            self._db.execute(f"DROP TRIGGER IF EXISTS {_quote(name)}")
            self._db.execute(sql)
        self._enqueue_all(spec)
        logger.info(
            "capture installed; existing rows enqueued",
            extra={"action": "source_setup", "source": self.name, "table": spec.table},
        )
        return True

    def _enqueue_all(self, spec: TableSpec) -> None:
        self._db.execute(
            f"INSERT INTO {OUTBOX}(tbl, key, op) "
            f"SELECT ?, {_quote(spec.key)}, 'snapshot' FROM {_quote(spec.table)}",
            (spec.table,),
        )

    async def teardown(self) -> None:
        await self._lane.run(self._teardown)

    def _teardown(self) -> None:
        with wrap_errors("remove capture"):
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                names = db.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'trigger' "
                    "AND name LIKE '\\_vectorsync\\_%' ESCAPE '\\'"
                ).fetchall()
                for (name,) in names:
                    db.execute(f"DROP TRIGGER IF EXISTS {_quote(name)}")
                db.execute(f"DROP TABLE IF EXISTS {OUTBOX}")
                db.execute(f"DROP TABLE IF EXISTS {META}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    async def epoch(self) -> str:
        return await self._lane.run(self._epoch)

    def _epoch(self) -> str:
        with wrap_errors("read the capture epoch"):
            if not self._installed():
                return ""
            try:
                row = self._db.execute(f"SELECT value FROM {META} WHERE name = 'epoch'").fetchone()
            except sqlite3.OperationalError:  # an outbox installed before epochs existed
                return "legacy"
        return str(row[0]) if row else "legacy"

    async def resnapshot(self, spec: TableSpec) -> None:
        await self._lane.run(self._resnapshot, spec)

    def _resnapshot(self, spec: TableSpec) -> None:
        with wrap_errors(f"resnapshot {spec.table!r}"):
            self._enqueue_all(spec)

    async def enqueue(self, table: str, keys: Sequence[Key]) -> None:
        await self._lane.run(self._enqueue, table, list(keys))

    def _enqueue(self, table: str, keys: list[Key]) -> None:
        with wrap_errors(f"enqueue {table!r}"):
            self._db.executemany(
                f"INSERT INTO {OUTBOX}(tbl, key, op) VALUES (?, ?, 'replay')",
                [(table, k) for k in keys],
            )

    async def head(self) -> int:
        return await self._lane.run(self._head)

    def _head(self) -> int:
        with wrap_errors("read head"):
            if not self._installed():
                return 0
            row = self._db.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = ?", (OUTBOX,)
            ).fetchone()
        return int(row[0]) if row else 0

    def _installed(self) -> bool:
        found = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (OUTBOX,)
        ).fetchone()
        return found is not None

    async def read_changes(self, after: int, limit: int) -> list[Change]:
        return await self._lane.run(self._read_changes, after, limit)

    def _read_changes(self, after: int, limit: int) -> list[Change]:
        with wrap_errors("read outbox"):
            self._db.execute("BEGIN")  # one snapshot: these rows belong to this epoch
            try:
                self._read_epoch = self._epoch()
                rows = self._db.execute(
                    f"SELECT seq, tbl, key, op, committed_at FROM {OUTBOX} "
                    "WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after, limit),
                ).fetchall()
            finally:
                self._db.execute("COMMIT")
        return [
            Change(table=t, key=k, op=op, position=seq, committed_at=ts)
            for seq, t, k, op, ts in rows
        ]

    async def wait(self, timeout: float) -> None:
        await asyncio.sleep(timeout)  # polled: SQLite has no change notification

    async def fetch(self, table: str, key: str, keys: Sequence[Key]) -> dict[Key, dict[str, Any]]:
        return await self._lane.run(self._fetch, table, key, list(keys))

    def _fetch(self, table: str, key: str, keys: list[Key]) -> dict[Key, dict[str, Any]]:
        found: dict[Key, dict[str, Any]] = {}
        with wrap_errors(f"re-read {table!r}"):
            for i in range(0, len(keys), _FETCH_CHUNK):
                chunk = keys[i : i + _FETCH_CHUNK]
                marks = ",".join("?" * len(chunk))
                cur = self._db.execute(
                    f"SELECT * FROM {_quote(table)} WHERE {_quote(key)} IN ({marks})", chunk
                )
                names = [d[0] for d in cur.description]
                for values in cur:
                    row = dict(zip(names, values, strict=True))
                    found[row[key]] = row
        return found

    async def write_back(self, spec: TableSpec, key: Key, values: Mapping[str, Any]) -> None:
        """Set columns of one row (sink edits a conflict policy keeps, see conflicts)."""
        await self._lane.run(self._write_back, spec, key, dict(values))

    def _write_back(self, spec: TableSpec, key: Key, values: dict[str, Any]) -> None:
        sets = ", ".join(f"{_quote(c)} = ?" for c in values)
        with wrap_errors(f"write back to {spec.table!r}"):
            self._db.execute(
                f"UPDATE {_quote(spec.table)} SET {sets} WHERE {_quote(spec.key)} = ?",
                [*values.values(), key],
            )

    async def related(
        self, owner: TableSpec, rel: Relation, keys: Sequence[Key]
    ) -> dict[Key, list[RelatedRecord]]:
        return await self._lane.run(self._related, owner, rel, list(keys))

    def _related(
        self, owner: TableSpec, rel: Relation, keys: list[Key]
    ) -> dict[Key, list[RelatedRecord]]:
        assert rel.on is not None
        rc, oc = rel.on
        cols = ", ".join(f"r.{_quote(column)}" for _, column in rel.fields)
        query = (
            f"SELECT o.{_quote(owner.key)}, r.{_quote(rel.key)}, {cols} "
            f"FROM {_quote(owner.table)} AS o JOIN {_quote(rel.table)} AS r "
            f"ON r.{_quote(rc)} = o.{_quote(oc)} WHERE o.{_quote(owner.key)} IN "
        )
        found: dict[Key, list[RelatedRecord]] = {}
        with wrap_errors(f"read {rel.name!r} of {owner.table!r}"):
            for i in range(0, len(keys), _FETCH_CHUNK):
                chunk = keys[i : i + _FETCH_CHUNK]
                for values in self._db.execute(query + f"({','.join('?' * len(chunk))})", chunk):
                    fields = dict(zip(rel.outputs, values[2:], strict=True))
                    found.setdefault(values[0], []).append((values[1], fields))
        return found

    async def dependents(
        self, owner: TableSpec, rel: Relation, related_keys: Sequence[Key]
    ) -> list[Key]:
        return await self._lane.run(self._dependents, owner, rel, list(related_keys))

    def _dependents(self, owner: TableSpec, rel: Relation, related_keys: list[Key]) -> list[Key]:
        assert rel.on is not None
        rc, oc = rel.on
        ok, o = _quote(owner.key), _quote(owner.table)
        if rc == rel.key:  # the owner holds the related key: no join (works after deletes)
            query = f"SELECT o.{ok} FROM {o} AS o WHERE o.{_quote(oc)} IN "
        else:
            query = (
                f"SELECT DISTINCT o.{ok} FROM {o} AS o JOIN {_quote(rel.table)} AS r "
                f"ON r.{_quote(rc)} = o.{_quote(oc)} WHERE r.{_quote(rel.key)} IN "
            )
        found: list[Key] = []
        with wrap_errors(f"find records depending on {rel.table!r}"):
            for i in range(0, len(related_keys), _FETCH_CHUNK):
                chunk = related_keys[i : i + _FETCH_CHUNK]
                rows = self._db.execute(query + f"({','.join('?' * len(chunk))})", chunk)
                found.extend(r[0] for r in rows)
        return found

    async def scan(
        self, table: str, key: str, *, page: int = 5000, after: Key | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        while True:
            rows = await self._lane.run(self._scan_page, table, key, after, page)
            for row in rows:
                yield row
            if len(rows) < page:
                return
            after = rows[-1][key]

    def _scan_page(self, table: str, key: str, after: Any, page: int) -> list[dict[str, Any]]:
        t, k = _quote(table), _quote(key)
        where, args = ("", (page,)) if after is None else (f"WHERE {k} > ?", (after, page))
        with wrap_errors(f"scan {table!r}"):
            cur = self._db.execute(f"SELECT * FROM {t} {where} ORDER BY {k} LIMIT ?", args)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, values, strict=True)) for values in cur]

    async def ack(self, position: int) -> None:
        await self._lane.run(self._ack, position)

    def _ack(self, position: int) -> None:
        # only in the epoch the changes were read from: an outbox installed anew since
        # numbers from 1 again, and its rows are not the ones acknowledged
        with wrap_errors("release outbox"):
            if self._epoch() == self._read_epoch:
                self._db.execute(f"DELETE FROM {OUTBOX} WHERE seq <= ?", (position,))

    async def backlog(self, after: int) -> Backlog:
        return await self._lane.run(self._backlog, after)

    def _backlog(self, after: int) -> Backlog:
        with wrap_errors("read backlog"):
            if not self._installed():
                return Backlog(changes=0, oldest_committed_at=None)
            count, oldest = self._db.execute(
                f"SELECT COUNT(*), MIN(committed_at) FROM {OUTBOX} WHERE seq > ?", (after,)
            ).fetchone()
        return Backlog(changes=int(count), oldest_committed_at=oldest)
