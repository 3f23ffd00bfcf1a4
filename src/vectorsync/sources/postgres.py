"""PostgreSQL source: logical replication (pgoutput) or a trigger outbox.

Both capture modes share everything but the change feed: re-reads, scans, table checks and
the resumable snapshot. A snapshot reads keys in keyset pages and hands each page to the
change feed in one transaction with its progress row (``vectorsync.snapshots``), so a crash
mid-snapshot resumes after the last committed page. The first snapshot of a logical slot
reads at the slot's consistent point (its exported snapshot); a resumed one reads current
rows, which is equally safe because the slot has kept every change since that point.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Any, Literal, Protocol

import psycopg
import xxhash
from psycopg import sql

from ..errors import ConfigError, PermanentError, SourceError
from ..model import Change, Key
from ..redact import redact
from ..related import RelatedRecord, Relation
from .base import Backlog, TableSpec

__all__ = ["PostgresSource", "capture_name", "derived_name", "redact", "wrap_errors"]

logger = logging.getLogger(__name__)

SCHEMA = "vectorsync"
IDENT_BYTES = 63  # NAMEDATALEN - 1
_HASHED = re.compile(r"__[0-9a-f]{16}\Z")  # what derived_name appends
_PLAIN = re.compile(r"[a-z0-9_]+\Z")
_SLOT = re.compile(r"[a-z0-9_]{1,63}\Z")
SNAPSHOT_PAGE = 5000
_FETCH_CHUNK = 1000
_PROGRESS = (
    f"INSERT INTO {SCHEMA}.snapshots (capture, tbl, last_key, done) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT (capture, tbl) DO UPDATE SET last_key = EXCLUDED.last_key, done = EXCLUDED.done"
)

_NEW_EPOCH = (
    f"INSERT INTO {SCHEMA}.captures AS c (capture, source, mode, epoch) "
    "VALUES (%s, %s, %s, %s) ON CONFLICT (capture) DO UPDATE SET source = EXCLUDED.source, "
    "mode = EXCLUDED.mode, epoch = EXCLUDED.epoch, created_at = now()"
)
_ADOPT_EPOCH = _NEW_EPOCH + " WHERE c.mode <> EXCLUDED.mode"


@contextlib.contextmanager
def wrap_errors(what: str) -> Iterator[None]:
    """Connection trouble is retryable; anything else the server refused is permanent."""
    try:
        yield
    except (psycopg.OperationalError, psycopg.errors.AdminShutdown) as exc:
        raise SourceError(f"postgres source: {what}: {exc}".strip(), code=exc.sqlstate) from exc
    except psycopg.Error as exc:
        raise PermanentError(f"postgres source: {what}: {exc}".strip(), code=exc.sqlstate) from exc


def derived_name(*parts: str, verbatim: bool = True, plain: bool = False) -> str:
    """The name of an object vectorsync derives from ``parts``: at most 63 bytes (longer
    identifiers are silently cut by the server, so two would become one) and distinct for
    distinct parts.

    ``"_".join(parts)`` itself when it fits, cannot be mistaken for a hashed name and
    ``verbatim`` is allowed: the caller's parts vary in one place only, so the join is
    unambiguous (these are the names existing installs already use). Otherwise a readable
    prefix of the join, cut on a character boundary, then ``__`` and a 64-bit hash of the
    parts. ``plain`` keeps the name to ``[a-z0-9_]`` (replication slot names)."""
    joined = "_".join(parts)
    if (
        verbatim
        and len(joined.encode()) <= IDENT_BYTES
        and not _HASHED.search(joined)
        and (not plain or _PLAIN.fullmatch(joined))
    ):
        return joined
    digest = xxhash.xxh3_64_hexdigest(json.dumps(parts).encode())  # a list: unambiguous
    readable = re.sub(r"[^a-z0-9_]", "_", joined.lower()) if plain else joined
    room = IDENT_BYTES - len("__") - len(digest)
    prefix = readable.encode()[:room].decode(errors="ignore")  # drops a cut character
    return f"{prefix}__{digest}"


def capture_name(source: str) -> str:
    """Default slot / publication / outbox name: ``vectorsync_<source>``, hashed when the
    source name is not lower case letters, digits and underscores or is too long."""
    return derived_name("vectorsync", source, plain=True)


def _legacy_capture_name(source: str) -> str:
    """The default name before names were bounded and distinct ("My-DB" and "my_db" met)."""
    return "vectorsync_" + re.sub(r"[^a-z0-9_]", "_", source.lower())


def split_table(table: str) -> tuple[str, str]:
    schema, _, name = table.rpartition(".")
    return schema or "public", name


def table_ident(table: str) -> sql.Composable:
    return sql.Identifier(*split_table(table))


def plain(value: Any) -> Any:
    """A database value as a JSON-friendly Python value (what templates and payloads get)."""
    if value is None or isinstance(value, str | int | float | bool | dict | list):
        return value
    if isinstance(value, Decimal):
        if not value.is_finite():  # NaN, Infinity: a float, which the payload refuses
            return float(value)
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, memoryview):
        return bytes(value)
    return value if isinstance(value, bytes) else str(value)


class Capture(Protocol):
    """The change feed half of a PostgreSQL source."""

    async def install(self, source: PostgresSource, tables: Sequence[TableSpec]) -> list[str]: ...

    async def write_keys(
        self, conn: psycopg.AsyncConnection[Any], table: str, keys: Sequence[Key], op: str
    ) -> None:
        """Hand keys to the change feed inside the caller's transaction."""
        ...

    async def head(self) -> int: ...

    async def read_changes(self, after: int, limit: int) -> list[Change]: ...

    async def ack(self, position: int) -> None: ...

    async def backlog(self, after: int) -> Backlog: ...

    async def wait(self, timeout: float) -> None: ...

    async def teardown(self) -> None: ...

    async def epoch(self) -> str: ...

    async def close(self) -> None: ...


class PostgresSource:
    def __init__(
        self,
        name: str,
        url: str,
        *,
        capture: Literal["logical", "outbox"] | None = None,
        slot: str | None = None,
        heartbeat_interval: float = 10.0,
    ) -> None:
        self.name = name
        self.url = url
        self.capture_mode = capture
        if slot is not None and not _SLOT.fullmatch(slot):
            raise ConfigError(
                f"source {name!r}: slot {slot!r} is not a replication slot name; use 1 to 63 "
                "lower case letters, digits and underscores"
            )
        self.slot = slot or capture_name(name)
        legacy = _legacy_capture_name(name)
        self._default_slot = slot is None
        self._legacy = (
            legacy if slot is None and legacy != self.slot and len(legacy) <= IDENT_BYTES else None
        )
        self.heartbeat_interval = heartbeat_interval
        self._conn: psycopg.AsyncConnection[tuple[Any, ...]] | None = None
        self._lock = asyncio.Lock()
        self._capture: Capture | None = None
        self._key_types: dict[str, tuple[str, bool]] = {}  # table -> (SQL type, is integer)

    def __repr__(self) -> str:
        return f"PostgresSource({self.name!r}, {redact(self.url)!r}, capture={self.capture_mode!r})"

    # -- connections ------------------------------------------------------------------------
    async def connect(self, **kwargs: Any) -> psycopg.AsyncConnection[tuple[Any, ...]]:
        try:
            return await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, application_name=f"vectorsync-{self.name}", **kwargs
            )
        except psycopg.Error as exc:
            raise SourceError(
                f"source {self.name!r}: cannot connect to {redact(self.url)}: {exc}".strip(),
                code=exc.sqlstate,
            ) from exc

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[psycopg.AsyncConnection[tuple[Any, ...]]]:
        """The shared query connection, one user at a time (the worker, ``head`` from a
        waiter and the HTTP status interleave); reconnected after it broke."""
        async with self._lock:
            if self._conn is None or self._conn.closed or self._conn.broken:
                self._conn = await self.connect()
            yield self._conn

    async def open(self) -> None:
        async with self.session() as conn:
            with wrap_errors("read wal_level"):
                row = await (await conn.execute("SHOW wal_level")).fetchone()
            wal_level = row[0] if row else "replica"
            if self.capture_mode is None:
                self.capture_mode = "logical" if wal_level == "logical" else "outbox"
            elif self.capture_mode == "logical" and wal_level != "logical":
                raise ConfigError(
                    f"source {self.name!r}: capture = 'logical' needs wal_level = logical "
                    f"(the server has {wal_level!r}); set it in postgresql.conf and restart the "
                    "server, or use capture = 'outbox'"
                )
            if self._legacy is not None:
                await self._keep_legacy_name(conn)
            if self.capture_mode == "logical":
                from .pg_logical import LogicalCapture

                self._capture = LogicalCapture(self)
            else:
                from .pg_outbox import OutboxCapture

                self._capture = OutboxCapture(self)

    async def _keep_legacy_name(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Keep the capture an older vectorsync installed under the sanitized source name
        (a new name would leave its slot pinning WAL, or its triggers filling an outbox
        nobody reads), unless that capture is recorded as another source's."""
        assert self._legacy is not None
        outbox = sql.Identifier(SCHEMA, derived_name(self._legacy, "outbox"))
        with wrap_errors("look for an existing capture"):
            row = await (
                await conn.execute(
                    "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = %s "
                    "AND database = current_database()) OR to_regclass(%s) IS NOT NULL, "
                    "to_regclass(%s) IS NOT NULL",
                    (self._legacy, outbox.as_string(conn), f"{SCHEMA}.captures"),
                )
            ).fetchone()
            if row is None or not row[0]:
                return
            if row[1]:
                owner = await (
                    await conn.execute(
                        f"SELECT source FROM {SCHEMA}.captures WHERE capture = %s",
                        (self._legacy,),
                    )
                ).fetchone()
                if owner is not None and owner[0] != self.name:
                    return
        self.slot = self._legacy

    async def check_owner(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Refuse to share a default-named capture with another source (possible only
        when an older install's name was kept, see ``_keep_legacy_name``)."""
        row = await (
            await conn.execute(
                f"SELECT source FROM {SCHEMA}.captures WHERE capture = %s", (self.slot,)
            )
        ).fetchone()
        if self._default_slot and row is not None and row[0] != self.name:
            raise ConfigError(
                f"source {self.name!r}: capture {self.slot!r} in {redact(self.url)} belongs to "
                f'source {row[0]!r}; give this source a slot of its own (slot = "..." in '
                "its [sources] section)"
            )

    async def close(self) -> None:
        if self._capture is not None:
            await self._capture.close()
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    @property
    def feed(self) -> Capture:
        if self._capture is None:
            raise RuntimeError("source is not open")
        return self._capture

    # -- tables -----------------------------------------------------------------------------
    async def columns(self, table: str) -> dict[str, str]:
        schema, name = split_table(table)
        async with self.session() as conn:
            with wrap_errors(f"describe {table!r}"):
                cur = await conn.execute(
                    "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
                    "JOIN pg_class c ON c.oid = a.attrelid "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p') "
                    "AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                    (schema, name),
                )
                rows = await cur.fetchall()
                if not rows:
                    cur = await conn.execute(
                        "SELECT table_schema || '.' || table_name FROM information_schema.tables "
                        "WHERE table_schema NOT IN ('pg_catalog', 'information_schema', %s) "
                        "ORDER BY 1",
                        (SCHEMA,),
                    )
                    tables = [r[0].removeprefix("public.") for r in await cur.fetchall()]
                    raise ConfigError(
                        f"source {self.name!r}: table {table!r} not found in {redact(self.url)} "
                        f"(tables: {', '.join(tables) or 'none'})"
                    )
        return {r[0]: r[1].upper() for r in rows}

    async def check_key(self, spec: TableSpec) -> None:
        await self.check_table(spec, needs_identity=self.capture_mode == "logical")

    async def check_table(self, spec: TableSpec, *, needs_identity: bool) -> None:
        """Refuse a table whose key does not identify one row, or (for logical capture)
        whose deletes would not carry the key."""
        async with self.session() as conn:
            with wrap_errors(f"inspect {spec.table!r}"):
                cur = await conn.execute(
                    "SELECT c.relreplident, i.indisprimary, i.indisreplident, i.indisunique, "
                    "ARRAY(SELECT a.attname::text FROM unnest(i.indkey) k "
                    "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k) "
                    "FROM pg_class c LEFT JOIN pg_index i ON i.indrelid = c.oid "
                    "WHERE c.oid = %s::regclass",
                    (sql.Identifier(*split_table(spec.table)).as_string(conn),),
                )
                rows = await cur.fetchall()
        cols = await self.columns(spec.table)
        t, k = spec.table, spec.key
        identity = rows[0][0] if rows else "d"
        unique = any(r[3] and r[4] == [k] for r in rows)
        if not unique:
            raise ConfigError(
                f"source {self.name!r}: table {t!r} has no primary key or unique index on "
                f"{k!r}, so a key may name several rows; add one "
                f"(ALTER TABLE {t} ADD PRIMARY KEY ({k})) or map the table by its primary key"
            )
        if needs_identity and identity != "f":
            wanted = "i" if identity == "i" else "d"
            ident_cols = [
                r[4] for r in rows if (r[2] if wanted == "i" else r[1]) and r[4] is not None
            ]
            if identity == "n" or not ident_cols or k not in ident_cols[0]:
                raise ConfigError(
                    f"source {self.name!r}: table {t!r} has no usable REPLICA IDENTITY for key "
                    f"{k!r} (deletes would not carry it); run ALTER TABLE {t} REPLICA IDENTITY "
                    f"FULL, or make {k!r} the primary key, or use capture = 'outbox'"
                )
        if k not in cols:
            raise ConfigError(f"source {self.name!r}: table {t!r} has no column {k!r}")
        await self.key_type(t, k)

    def key_of(self, table: str, raw: Any) -> Key:
        return raw if isinstance(raw, int) else str(raw)

    async def key_type(self, table: str, key: str) -> tuple[str, bool]:
        if table not in self._key_types:
            col_type = (await self.columns(table))[key]
            self._key_types[table] = (
                col_type.lower(),
                col_type in ("INTEGER", "BIGINT", "SMALLINT"),
            )
        return self._key_types[table]

    # -- the Source protocol ----------------------------------------------------------------
    async def setup(self, tables: Sequence[TableSpec]) -> list[str]:
        return await self.feed.install(self, tables)

    async def teardown(self) -> None:
        """Remove everything ``setup`` created (slot, publication, triggers, outbox), and
        the ``vectorsync`` schema once no capture is left in it."""
        await self.feed.teardown()
        async with self.session() as conn:
            with wrap_errors("remove the vectorsync schema"):
                if await self._schema_unused(conn):
                    await conn.execute(
                        sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(SCHEMA))
                    )

    async def _schema_unused(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """No capture of any source left: no captures row, no outbox table in the schema."""
        cur = await conn.execute(
            "SELECT to_regnamespace(%s) IS NOT NULL, to_regclass(%s) IS NOT NULL, "
            "(SELECT count(*) FROM pg_tables WHERE schemaname = %s AND tablename LIKE %s)",
            (SCHEMA, f"{SCHEMA}.captures", SCHEMA, "%\\_outbox"),
        )
        row = await cur.fetchone()
        if row is None or not row[0]:
            return False
        if row[2]:
            return False
        if row[1]:
            left = await (await conn.execute(f"SELECT count(*) FROM {SCHEMA}.captures")).fetchone()
            return left is not None and left[0] == 0
        return True

    async def epoch(self) -> str:
        return await self.feed.epoch()

    async def resnapshot(self, spec: TableSpec) -> None:
        async for page in self.key_pages(spec, after=None):
            await self._write_keys(spec.table, page, "snapshot")

    async def enqueue(self, table: str, keys: Sequence[Key]) -> None:
        for i in range(0, len(keys), SNAPSHOT_PAGE):
            await self._write_keys(table, keys[i : i + SNAPSHOT_PAGE], "replay")

    async def _write_keys(self, table: str, keys: Sequence[Key], op: str) -> None:
        async with self.session() as conn:
            with wrap_errors(f"enqueue keys of {table!r}"):
                async with conn.transaction():
                    await self.feed.write_keys(conn, table, keys, op)

    async def key_pages(
        self,
        spec: TableSpec,
        after: str | None,
        conn: psycopg.AsyncConnection[tuple[Any, ...]] | None = None,
    ) -> AsyncIterator[list[Key]]:
        """Every key of a table after ``after`` (text form), in keyset pages."""
        sql_type, _ = await self.key_type(spec.table, spec.key)
        k, t = sql.Identifier(spec.key), table_ident(spec.table)
        last: Any = after
        while True:
            query = sql.SQL("SELECT {k} FROM {t} {where} ORDER BY {k} LIMIT {n}").format(
                k=k,
                t=t,
                n=sql.Literal(SNAPSHOT_PAGE),
                where=sql.SQL("")
                if last is None
                else sql.SQL("WHERE {k} > {v}::{ty}").format(
                    k=k, v=sql.Literal(str(last)), ty=sql.SQL(sql_type)
                ),
            )
            with wrap_errors(f"snapshot {spec.table!r}"):
                if conn is not None:
                    rows = await (await conn.execute(query)).fetchall()
                else:
                    async with self.session() as db:
                        rows = await (await db.execute(query)).fetchall()
            if not rows:
                return
            yield [self.key_of(spec.table, r[0]) for r in rows]
            if len(rows) < SNAPSHOT_PAGE:
                return
            last = rows[-1][0]

    async def head(self) -> int:
        return await self.feed.head()

    async def read_changes(self, after: int, limit: int) -> list[Change]:
        return await self.feed.read_changes(after, limit)

    async def wait(self, timeout: float) -> None:
        await self.feed.wait(timeout)

    async def fetch(self, table: str, key: str, keys: Sequence[Key]) -> dict[Key, dict[str, Any]]:
        sql_type, _ = await self.key_type(table, key)
        query = sql.SQL("SELECT * FROM {t} WHERE {k} = ANY(%s::{ty}[])").format(
            t=table_ident(table), k=sql.Identifier(key), ty=sql.SQL(sql_type)
        )
        found: dict[Key, dict[str, Any]] = {}
        async with self.session() as conn:
            with wrap_errors(f"re-read {table!r}"):
                for i in range(0, len(keys), _FETCH_CHUNK):
                    chunk = [str(k) for k in keys[i : i + _FETCH_CHUNK]]
                    cur = await conn.execute(query, (chunk,))
                    names = [d.name for d in cur.description or ()]
                    for values in await cur.fetchall():
                        row = {n: plain(v) for n, v in zip(names, values, strict=True)}
                        found[self.key_of(table, row[key])] = row
        return found

    async def write_back(self, spec: TableSpec, key: Key, values: Mapping[str, Any]) -> None:
        """Set columns of one row (sink edits a conflict policy keeps, see conflicts)."""
        sql_type, _ = await self.key_type(spec.table, spec.key)
        query = sql.SQL("UPDATE {t} SET {sets} WHERE {k} = %s::{ty}").format(
            t=table_ident(spec.table),
            sets=sql.SQL(", ").join(
                sql.SQL("{c} = %s").format(c=sql.Identifier(c)) for c in values
            ),
            k=sql.Identifier(spec.key),
            ty=sql.SQL(sql_type),
        )
        async with self.session() as conn:
            with wrap_errors(f"write back to {spec.table!r}"):
                await conn.execute(query, (*values.values(), str(key)))
                await conn.commit()

    async def related(
        self, owner: TableSpec, rel: Relation, keys: Sequence[Key]
    ) -> dict[Key, list[RelatedRecord]]:
        assert rel.on is not None
        rc, oc = rel.on
        owner_type, _ = await self.key_type(owner.table, owner.key)
        query = sql.SQL(
            "SELECT o.{ok}, r.{rk}, {cols} FROM {o} AS o JOIN {r} AS r ON r.{rc} = o.{oc} "
            "WHERE o.{ok} = ANY(%s::{ty}[])"
        ).format(
            ok=sql.Identifier(owner.key),
            rk=sql.Identifier(rel.key),
            cols=sql.SQL(", ").join(
                sql.SQL("r.{}").format(sql.Identifier(c)) for _, c in rel.fields
            ),
            o=table_ident(owner.table),
            r=table_ident(rel.table),
            rc=sql.Identifier(rc),
            oc=sql.Identifier(oc),
            ty=sql.SQL(owner_type),
        )
        found: dict[Key, list[RelatedRecord]] = {}
        async with self.session() as conn:
            with wrap_errors(f"read {rel.name!r} of {owner.table!r}"):
                for i in range(0, len(keys), _FETCH_CHUNK):
                    chunk = [str(k) for k in keys[i : i + _FETCH_CHUNK]]
                    for values in await (await conn.execute(query, (chunk,))).fetchall():
                        fields = {o: plain(v) for o, v in zip(rel.outputs, values[2:], strict=True)}
                        related = (self.key_of(rel.table, values[1]), fields)
                        found.setdefault(self.key_of(owner.table, values[0]), []).append(related)
        return found

    async def dependents(
        self, owner: TableSpec, rel: Relation, related_keys: Sequence[Key]
    ) -> list[Key]:
        assert rel.on is not None
        rc, oc = rel.on
        rel_type, _ = await self.key_type(rel.table, rel.key)
        names = {
            "ok": sql.Identifier(owner.key),
            "o": table_ident(owner.table),
            "r": table_ident(rel.table),
            "rk": sql.Identifier(rel.key),
            "rc": sql.Identifier(rc),
            "oc": sql.Identifier(oc),
            "ty": sql.SQL(rel_type),
        }
        if rc == rel.key:  # the owner holds the related key: no join (works after deletes)
            query = sql.SQL("SELECT o.{ok} FROM {o} AS o WHERE o.{oc} = ANY(%s::{ty}[])")
        else:
            query = sql.SQL(
                "SELECT DISTINCT o.{ok} FROM {o} AS o JOIN {r} AS r ON r.{rc} = o.{oc} "
                "WHERE r.{rk} = ANY(%s::{ty}[])"
            )
        found: list[Key] = []
        async with self.session() as conn:
            with wrap_errors(f"find records depending on {rel.table!r}"):
                for i in range(0, len(related_keys), _FETCH_CHUNK):
                    chunk = [str(k) for k in related_keys[i : i + _FETCH_CHUNK]]
                    cur = await conn.execute(query.format(**names), (chunk,))
                    found.extend(self.key_of(owner.table, r[0]) for r in await cur.fetchall())
        return found

    async def scan(
        self, table: str, key: str, *, page: int = 5000, after: Key | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        sql_type, _ = await self.key_type(table, key)
        k, t = sql.Identifier(key), table_ident(table)
        while True:
            where = (
                sql.SQL("")
                if after is None
                else sql.SQL("WHERE {k} > %s::{ty}").format(k=k, ty=sql.SQL(sql_type))
            )
            query = sql.SQL("SELECT * FROM {t} {w} ORDER BY {k} LIMIT {n}").format(
                t=t, w=where, k=k, n=sql.Literal(page)
            )
            async with self.session() as conn:
                with wrap_errors(f"scan {table!r}"):
                    cur = await conn.execute(query, () if after is None else (str(after),))
                    names = [d.name for d in cur.description or ()]
                    rows = await cur.fetchall()
                for values in rows:
                    yield {n: plain(v) for n, v in zip(names, values, strict=True)}
                if len(rows) < page:
                    return
                after = rows[-1][names.index(key)]

    async def ack(self, position: int) -> None:
        await self.feed.ack(position)

    async def backlog(self, after: int) -> Backlog:
        return await self.feed.backlog(after)

    # -- snapshot bookkeeping shared by both capture modes --------------------------------
    async def ensure_schema(self) -> None:
        async with self.session() as conn:
            with wrap_errors("create the vectorsync schema"):
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {SCHEMA}.snapshots (capture text NOT NULL, "
                    "tbl text NOT NULL, last_key text, done boolean NOT NULL DEFAULT false, "
                    "PRIMARY KEY (capture, tbl))"
                )
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {SCHEMA}.captures (capture text PRIMARY KEY, "
                    "source text NOT NULL, mode text NOT NULL, epoch text NOT NULL, "
                    "created_at timestamptz NOT NULL DEFAULT now())"
                )

    # -- the capture epoch ---------------------------------------------------------------
    async def renew_epoch(
        self, conn: psycopg.AsyncConnection[Any], mode: str, *, keep: bool = False
    ) -> None:
        """Give the capture a new identity (it is being installed anew). With ``keep``,
        only if it has none for ``mode`` yet: an install made before epochs existed."""
        await conn.execute(
            _ADOPT_EPOCH if keep else _NEW_EPOCH, (self.slot, self.name, mode, uuid.uuid4().hex)
        )

    async def forget_epoch(self, conn: psycopg.AsyncConnection[Any]) -> None:
        found = await (
            await conn.execute("SELECT to_regclass(%s)", (f"{SCHEMA}.captures",))
        ).fetchone()
        if found is not None and found[0] is not None:
            await conn.execute(f"DELETE FROM {SCHEMA}.captures WHERE capture = %s", (self.slot,))

    async def read_epoch(self, mode: str, installed: sql.Composable) -> str:
        """The stored epoch of this capture in ``mode``; ``""`` without one, or while
        ``installed`` (a SQL condition: the sequence, the slot) does not hold."""
        query = sql.SQL(
            "SELECT epoch FROM {t} WHERE capture = %s AND mode = %s AND {installed}"
        ).format(t=sql.Identifier(SCHEMA, "captures"), installed=installed)
        async with self.session() as conn:
            with wrap_errors("read the capture epoch"):
                try:
                    row = await (await conn.execute(query, (self.slot, mode))).fetchone()
                except psycopg.errors.UndefinedTable:  # never set up here
                    return ""
        return str(row[0]) if row else ""

    async def pending_snapshots(self, tables: Sequence[TableSpec]) -> dict[str, str | None]:
        """Tables whose snapshot has not completed, with the last key already handed over."""
        async with self.session() as conn:
            with wrap_errors("read snapshot progress"):
                cur = await conn.execute(
                    f"SELECT tbl, last_key, done FROM {SCHEMA}.snapshots WHERE capture = %s",
                    (self.slot,),
                )
                progress = {r[0]: (r[1], r[2]) for r in await cur.fetchall()}
            pending: dict[str, str | None] = {}
            for spec in tables:
                last, done = progress.get(spec.table, (None, False))
                if not done:
                    pending[spec.table] = last
        return pending

    async def snapshot_table(
        self,
        spec: TableSpec,
        after: str | None,
        reader: psycopg.AsyncConnection[tuple[Any, ...]] | None = None,
    ) -> int:
        """Hand every key after ``after`` to the change feed, a page per transaction with
        its progress row; ``reader`` reads the keys (e.g. inside an exported snapshot)."""
        handed = 0
        async for page in self.key_pages(spec, after, reader):
            async with self.session() as conn:
                with wrap_errors(f"snapshot {spec.table!r}"):
                    async with conn.transaction():
                        await self.feed.write_keys(conn, spec.table, page, "snapshot")
                        await conn.execute(_PROGRESS, (self.slot, spec.table, str(page[-1]), False))
                handed += len(page)
                logger.info(
                    "snapshot of %s: %d keys handed over",
                    spec.table,
                    handed,
                    extra={"action": "snapshot", "source": self.name, "table": spec.table},
                )
        async with self.session() as conn:
            with wrap_errors(f"snapshot {spec.table!r}"):
                await conn.execute(_PROGRESS, (self.slot, spec.table, None, True))
        return handed

    async def forget_snapshots(self) -> None:
        async with self.session() as conn:
            with wrap_errors("reset snapshot progress"):
                found = await (
                    await conn.execute("SELECT to_regclass(%s)", (f"{SCHEMA}.snapshots",))
                ).fetchone()
                if found is None or found[0] is None:
                    return
                await conn.execute(
                    f"DELETE FROM {SCHEMA}.snapshots WHERE capture = %s", (self.slot,)
                )
