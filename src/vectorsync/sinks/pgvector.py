"""pgvector sink: one PostgreSQL table per collection, in a schema of the sink's own.

A collection is a table ``<schema>.<collection>`` (``id uuid`` primary key, ``vector
vector(n)``, ``payload jsonb``) with an HNSW index whose operator class matches the distance
and, when the collection declares payload indexes, a GIN index on the payload (``@>``
containment serves equality filters). A payload-only update writes a new row version into
every index (a HOT update is impossible once an index covers the payload), the HNSW graph
included; ``payload_index=False`` leaves the payload unindexed and the pages half empty, so
that those updates are HOT and cost no index work (filters are then checked on the
candidates of the vector scan). Names longer than PostgreSQL's 63 bytes are bounded
the way the PostgreSQL source bounds its own (``derived_name``). Each table carries a
comment naming the collection, its dimension and distance: the catalog is PostgreSQL's own,
so it cannot drift from the tables, and a table without that comment is never adopted.

An alias is a view ``<schema>.<alias>`` (``SELECT * FROM`` the collection's table), swapped
in one transaction, so SQL readers of the alias follow a swap at once; the sink resolves an
alias to its table for every call (writes land in the live version). Scores mean what they
mean in Qdrant: cosine similarity (``1 - (a <=> b)``, cosine vectors are stored normalised),
the inner product for ``dot``, and the Euclidean distance for ``euclid`` (lower is nearer).

Every call that has returned is committed (the connection runs in autocommit; statements
that must go together run in one transaction).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
import psycopg
from psycopg import sql
from psycopg.types.json import set_json_loads

from ..errors import ConfigError, PermanentError, SinkError
from ..model import Condition, PayloadUpdate, Point, SinkRecord, dumps
from ..redact import redact
from ..sources.postgres import derived_name
from ._aliases import check_drop, check_rename, check_set_alias
from ._pgvector_sql import (
    HNSW_MAX_DIMENSION,
    ITERATIVE_SCAN,
    MARK,
    MIN_VERSION,
    OPCLASS,
    ORDER,
    SCORE,
    Entry,
    comment_info,
    record,
    split,
    table_name,
    vector_text,
    version,
    where_sql,
    wrap_errors,
)
from .base import CollectionSpec, Hit

__all__ = ["PgvectorSink", "table_name"]

logger = logging.getLogger(__name__)


class PgvectorSink:
    def __init__(
        self,
        name: str,
        url: str,
        *,
        schema: str = "vectors",
        hnsw: bool = True,
        payload_index: bool = True,
    ) -> None:
        self.name = name
        self.url = url
        self.schema = schema
        self.hnsw = hnsw
        self.payload_index = payload_index
        self._conn: psycopg.AsyncConnection[tuple[Any, ...]] | None = None
        self._lock = asyncio.Lock()
        self._version: tuple[int, ...] = ()
        self._staged: psycopg.AsyncConnection[tuple[Any, ...]] | None = None
        self._read: psycopg.AsyncConnection[tuple[Any, ...]] | None = None
        self._read_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"PgvectorSink({self.name!r}, {redact(self.url)!r}, schema={self.schema!r})"

    # -- connection ---------------------------------------------------------------------
    async def _connect(self) -> psycopg.AsyncConnection[tuple[Any, ...]]:
        try:
            conn = await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, application_name=f"vectorsync-{self.name}"
            )
        except psycopg.Error as exc:
            raise SinkError(
                redact(f"sink {self.name!r}: cannot connect to {self.url}: {exc}".strip()),
                code=exc.sqlstate,
            ) from exc
        set_json_loads(orjson.loads, conn)
        return conn

    @contextlib.asynccontextmanager
    async def _session(
        self, *, read: bool = False
    ) -> AsyncIterator[psycopg.AsyncConnection[tuple[Any, ...]]]:
        """The sink's connection, one user at a time; reconnected after it broke. Reads
        (retrieve, scroll, count, search) have a connection of their own, so a search does
        not wait behind a large write (a returned write is committed, so reads see it)."""
        if read:
            async with self._read_lock:
                if self._read is None or self._read.closed or self._read.broken:
                    self._read = await self._connect()
                yield self._read
            return
        async with self._lock:
            if self._conn is None or self._conn.closed or self._conn.broken:
                self._conn = await self._connect()
            yield self._conn

    async def open(self) -> None:
        async with self._session() as conn:
            await self._ensure_extension(conn)
            with wrap_errors(self.name, f"create schema {self.schema!r}"):
                await conn.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema))
                )

    async def _ensure_extension(self, conn: psycopg.AsyncConnection[Any]) -> None:
        where = redact(self.url)
        with wrap_errors(self.name, "read the vector extension"):
            row = await (
                await conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            ).fetchone()
        if row is None:
            try:
                await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except psycopg.errors.FeatureNotSupported as exc:  # no vector.control
                raise ConfigError(
                    f"sink {self.name!r}: the PostgreSQL server at {where} has no pgvector "
                    f"extension ({exc.diag.message_primary}); install pgvector on that server (the "
                    f"postgresql-NN-pgvector package, or build it from source), or point "
                    f"sinks.{self.name}.url at a server that has it"
                ) from exc
            except psycopg.errors.InsufficientPrivilege as exc:
                raise ConfigError(
                    f"sink {self.name!r}: not allowed to create the vector extension in {where} "
                    f"({exc.diag.message_primary}); have a superuser run CREATE EXTENSION "
                    "vector in that database once"
                ) from exc
            except psycopg.Error as exc:
                with wrap_errors(self.name, "create the vector extension"):
                    raise exc
            with wrap_errors(self.name, "read the vector extension"):
                row = await (
                    await conn.execute(
                        "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
                    )
                ).fetchone()
        assert row is not None
        self._version = version(str(row[0]))
        if self._version < MIN_VERSION:
            raise ConfigError(
                f"sink {self.name!r}: pgvector {row[0]} in {where} is too old (need "
                f"{'.'.join(map(str, MIN_VERSION))} or newer); install a newer pgvector and run "
                "ALTER EXTENSION vector UPDATE"
            )

    async def close(self) -> None:
        for conn in (self._conn, self._read):
            if conn is not None:
                await conn.close()
        self._conn = self._read = None

    async def problems(self) -> list[str]:
        try:  # a probe must not queue behind a long write: a busy connection is a live one
            await asyncio.wait_for(self._lock.acquire(), timeout=0.2)
        except TimeoutError:
            return []
        try:
            if self._conn is None or self._conn.closed or self._conn.broken:
                self._conn = await self._connect()
            row = await (
                await self._conn.execute(
                    "SELECT pg_is_in_recovery(), current_setting(%s)", ("transaction_read_only",)
                )
            ).fetchone()
        except SinkError as exc:  # from connecting: it names the server already
            return [str(exc)]
        except psycopg.Error as exc:
            return [redact(f"sink {self.name!r}: cannot reach {self.url}: {exc}".strip())]
        finally:
            self._lock.release()
        if row is not None and (row[0] or row[1] == "on"):
            return [
                f"sink {self.name!r}: {redact(self.url)} is read-only (a standby, or "
                "default_transaction_read_only); point the sink at the primary"
            ]
        return []

    # -- the catalog: table and view comments -------------------------------------------
    async def _catalog(
        self, conn: psycopg.AsyncConnection[Any], names: Sequence[str] | None = None
    ) -> dict[str, Entry]:
        """The collections and aliases in the schema by name: all, or those of ``names``."""
        query = (
            "SELECT c.relname, c.relkind, obj_description(c.oid, 'pg_class') FROM pg_class c "
            "WHERE c.relnamespace = to_regnamespace(%s) AND c.relkind IN ('r', 'v')"
        )
        params: tuple[Any, ...] = (sql.Identifier(self.schema).as_string(conn),)
        if names is not None:  # one index lookup each instead of a scan of the schema
            query += " AND c.relname = ANY(%s)"
            params += ([table_name(n) for n in names],)
        with wrap_errors(self.name, f"list the collections in schema {self.schema!r}"):
            rows = await (await conn.execute(query, params)).fetchall()
        found: dict[str, Entry] = {}
        for table, kind, comment in rows:
            info = comment_info(comment)
            if info is None or kind != ("v" if "alias_of" in info else "r"):
                continue
            if names is not None and info["name"] not in names:
                continue
            found[str(info["name"])] = Entry(
                name=str(info["name"]),
                table=str(table),
                alias_of=info.get("alias_of"),
                dimension=int(info.get("dimension", 0)),
                distance=info.get("distance", "cosine"),
            )
        return found

    async def _resolve(self, conn: psycopg.AsyncConnection[Any], name: str) -> Entry:
        """The collection ``name`` is, or the one the alias ``name`` names."""
        entry = (await self._catalog(conn, [name])).get(name)
        if entry is not None and entry.alias_of is not None:
            target = (await self._catalog(conn, [entry.alias_of])).get(entry.alias_of)
            if target is None or target.alias_of is not None:
                raise PermanentError(
                    f"sink {self.name!r}: alias {name!r} names {entry.alias_of!r}, which is "
                    "missing; point it at a collection with set_alias"
                )
            return target
        if entry is None:
            raise PermanentError(
                f"sink {self.name!r}: no collection {name!r} in schema {self.schema!r}; "
                "ensure_collection creates it"
            )
        return entry

    async def _check_free(self, conn: psycopg.AsyncConnection[Any], table: str, what: str) -> None:
        """PermanentError if a relation of someone else's holds the name ``table``."""
        cur = await conn.execute("SELECT to_regclass(%s)", (self._ident(table).as_string(conn),))
        row = await cur.fetchone()
        if row is not None and row[0] is not None:
            raise PermanentError(
                f"sink {self.name!r}: cannot {what}: {self.schema}.{table} exists and is not "
                f"vectorsync's; drop or rename it, or set sinks.{self.name}.schema_name to "
                "another schema"
            )

    def _ident(self, table: str) -> sql.Identifier:
        return sql.Identifier(self.schema, table)

    def _describe(self, entry: Entry) -> sql.Composed:
        info: dict[str, Any] = {MARK: 1, "name": entry.name}
        if entry.alias_of is not None:
            info["alias_of"] = entry.alias_of
        else:
            info.update(dimension=entry.dimension, distance=entry.distance)
        kind = sql.SQL("VIEW" if entry.alias_of is not None else "TABLE")
        return sql.SQL("COMMENT ON {} {} IS {}").format(
            kind, self._ident(entry.table), sql.Literal(json.dumps(info, sort_keys=True))
        )

    async def _lock_schema(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Serialise catalog changes (create, alias, rename, drop) across processes."""
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
            (f"vectorsync-pgvector:{self.schema}",),
        )

    # -- collections --------------------------------------------------------------------
    async def ensure_collection(self, spec: CollectionSpec) -> None:
        async with self._session() as conn:
            with wrap_errors(self.name, f"create collection {spec.name!r}"):
                async with conn.transaction():
                    await self._lock_schema(conn)
                    await self._ensure(conn, spec)

    async def _ensure(self, conn: psycopg.AsyncConnection[Any], spec: CollectionSpec) -> None:
        catalog = await self._catalog(conn)
        entry = catalog.get(spec.name)
        if entry is not None and entry.alias_of is not None:
            entry = await self._resolve(conn, spec.name)
        if entry is None:
            entry = await self._create(conn, spec)
        elif (entry.dimension, entry.distance) != (spec.dimension, spec.distance):
            raise PermanentError(
                f"sink {self.name!r}: collection {entry.name!r} has dimension "
                f"{entry.dimension} and {entry.distance} distance, not {spec.dimension} and "
                f"{spec.distance}; use another collection name"
            )
        if spec.indexes and self.payload_index:
            await conn.execute(
                sql.SQL(
                    "CREATE INDEX IF NOT EXISTS {} ON {} USING gin (payload jsonb_path_ops)"
                ).format(
                    sql.Identifier(derived_name(entry.table, "payload")), self._ident(entry.table)
                )
            )

    async def _create(self, conn: psycopg.AsyncConnection[Any], spec: CollectionSpec) -> Entry:
        table = table_name(spec.name)
        if self.hnsw and spec.dimension > HNSW_MAX_DIMENSION:
            raise PermanentError(
                f"sink {self.name!r}: collection {spec.name!r}: an HNSW index takes at most "
                f"{HNSW_MAX_DIMENSION} dimensions, not {spec.dimension}; use a smaller model or "
                f"set sinks.{self.name}.hnsw = false (exact search)"
            )
        await self._check_free(conn, table, f"create collection {spec.name!r}")
        entry = Entry(name=spec.name, table=table, dimension=spec.dimension, distance=spec.distance)
        await conn.execute(
            sql.SQL(
                "CREATE TABLE {t} (id uuid CONSTRAINT {pk} PRIMARY KEY, "
                "vector vector({n}) NOT NULL, payload jsonb NOT NULL DEFAULT '{{}}'){options}"
            ).format(
                t=self._ident(table),
                pk=sql.Identifier(derived_name(table, "pkey")),
                n=sql.Literal(spec.dimension),
                # no index on the payload: leave room on each page, so that a payload update
                # is a HOT update, which writes no index entry (with an index on the payload
                # every update inserts the row into the HNSW graph again)
                options=sql.SQL("" if self.payload_index else " WITH (fillfactor = 50)"),
            )
        )
        if self.hnsw:
            await conn.execute(
                sql.SQL("CREATE INDEX {} ON {} USING hnsw (vector {})").format(
                    sql.Identifier(derived_name(table, "hnsw")),
                    self._ident(table),
                    sql.SQL(OPCLASS[spec.distance]),
                )
            )
        await conn.execute(self._describe(entry))
        logger.info(
            "created collection %s as %s.%s",
            spec.name,
            self.schema,
            table,
            extra={"action": "sink_create", "sink": self.name, "collection": spec.name},
        )
        return entry

    # -- writes -------------------------------------------------------------------------
    async def upsert(self, collection: str, points: Sequence[Point]) -> None:
        rows = list({p.id: p for p in points}.values())  # a statement writes a row once
        async with self._session() as conn:
            entry = await self._resolve(conn, collection)
            vector = sql.SQL("l2_normalize(s.v)" if entry.distance == "cosine" else "s.v")
            merge = sql.SQL(
                "INSERT INTO {t} (id, vector, payload) SELECT s.id, {vector}, s.p "
                "FROM pg_temp.vectorsync_points s ON CONFLICT (id) DO UPDATE "
                "SET vector = EXCLUDED.vector, payload = EXCLUDED.payload"
            ).format(t=self._ident(entry.table), vector=vector)
            with wrap_errors(self.name, f"upsert into {collection!r}"):
                await self._stage(conn)
                async with conn.transaction():
                    cur = conn.cursor()
                    async with cur.copy("COPY pg_temp.vectorsync_points FROM STDIN") as copy:
                        for p in rows:
                            await copy.write_row(
                                (p.id, vector_text(p.vector), dumps(p.payload).decode())
                            )
                    await conn.execute(merge)

    async def update_payloads(self, collection: str, updates: Sequence[PayloadUpdate]) -> list[str]:
        latest = list({u.id: u for u in updates}.values())
        async with self._session() as conn:
            entry = await self._resolve(conn, collection)
            merge = sql.SQL(
                "UPDATE {t} AS t SET payload = (t.payload - s.unset) || s.set "
                "FROM pg_temp.vectorsync_payloads s WHERE t.id = s.id RETURNING t.id"
            ).format(t=self._ident(entry.table))
            with wrap_errors(self.name, f"update payloads in {collection!r}"):
                await self._stage(conn)
                async with conn.transaction():
                    cur = conn.cursor()
                    async with cur.copy("COPY pg_temp.vectorsync_payloads FROM STDIN") as copy:
                        for u in latest:
                            await copy.write_row((u.id, dumps(u.set).decode(), list(u.unset)))
                    found = {str(r[0]) for r in await (await conn.execute(merge)).fetchall()}
        return [u.id for u in updates if u.id not in found]

    async def _stage(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """This connection's staging tables: a batch is copied in (``COPY`` is several
        times faster than parameters for vectors) and merged in one statement."""
        if self._staged is conn:
            return
        await conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS vectorsync_points "
            "(id uuid, v vector, p jsonb) ON COMMIT DELETE ROWS"
        )
        await conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS vectorsync_payloads "
            "(id uuid, set jsonb, unset text[]) ON COMMIT DELETE ROWS"
        )
        self._staged = conn

    async def delete(self, collection: str, ids: Sequence[str]) -> None:
        async with self._session() as conn:
            entry = await self._resolve(conn, collection)
            with wrap_errors(self.name, f"delete from {collection!r}"):
                await conn.execute(
                    sql.SQL("DELETE FROM {} WHERE id = ANY(%s::uuid[])").format(
                        self._ident(entry.table)
                    ),
                    (list(ids),),
                )

    # -- reads --------------------------------------------------------------------------
    async def retrieve(
        self, collection: str, ids: Sequence[str], *, with_vectors: bool = False
    ) -> list[SinkRecord]:
        async with self._session(read=True) as conn:
            entry = await self._resolve(conn, collection)
            with wrap_errors(self.name, f"retrieve from {collection!r}"):
                cur = await conn.execute(
                    sql.SQL("SELECT id, payload, {v} FROM {t} WHERE id = ANY(%s::uuid[])").format(
                        v=sql.SQL("vector::text" if with_vectors else "NULL"),
                        t=self._ident(entry.table),
                    ),
                    (list(ids),),
                )
                rows = await cur.fetchall()
        by_id = {str(r[0]): record(r) for r in rows}
        return [by_id[i] for i in dict.fromkeys(ids) if i in by_id]

    async def scroll(
        self,
        collection: str,
        *,
        with_vectors: bool = False,
        with_payload: bool = True,
        page: int = 1000,
    ) -> AsyncIterator[SinkRecord]:
        after: str | None = None
        while True:
            rows = await self._scroll_page(collection, after, page, with_vectors, with_payload)
            for r in rows:
                yield record(r)
            if len(rows) < page:
                return
            after = str(rows[-1][0])

    async def _scroll_page(
        self,
        collection: str,
        after: str | None,
        page: int,
        with_vectors: bool,
        with_payload: bool,
    ) -> list[tuple[Any, ...]]:
        async with self._session(read=True) as conn:
            entry = await self._resolve(conn, collection)
            query = sql.SQL("SELECT id, {p}, {v} FROM {t} {after} ORDER BY id LIMIT %s").format(
                after=sql.SQL("" if after is None else "WHERE id > %s::uuid"),
                p=sql.SQL("payload" if with_payload else "'{}'::jsonb"),
                v=sql.SQL("vector::text" if with_vectors else "NULL"),
                t=self._ident(entry.table),
            )
            with wrap_errors(self.name, f"scroll {collection!r}"):
                cur = await conn.execute(query, (page,) if after is None else (after, page))
                return await cur.fetchall()

    async def count(self, collection: str) -> int:
        async with self._session(read=True) as conn:
            entry = await self._resolve(conn, collection)
            with wrap_errors(self.name, f"count {collection!r}"):
                cur = await conn.execute(
                    sql.SQL("SELECT count(*) FROM {}").format(self._ident(entry.table))
                )
                row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def search(
        self,
        collection: str,
        vector: Sequence[float],
        limit: int = 5,
        where: Sequence[Condition] = (),
    ) -> list[Hit]:
        filters, params = where_sql(where)
        async with self._session(read=True) as conn:
            entry = await self._resolve(conn, collection)
            distance = sql.SQL("vector {} %(q)s::vector").format(sql.SQL(ORDER[entry.distance]))
            score = sql.SQL(SCORE[entry.distance]).format(d=distance)
            query = sql.SQL(
                "SELECT id, payload, NULL, {score} FROM {t} {where} ORDER BY {d} LIMIT %(limit)s"
            ).format(
                score=score,
                t=self._ident(entry.table),
                where=sql.SQL("WHERE ") + sql.SQL(" AND ").join(filters)
                if filters
                else sql.SQL(""),
                d=distance,
            )
            params.update(q=vector_text(vector), limit=limit)
            with wrap_errors(self.name, f"search {collection!r}"):
                async with conn.transaction():
                    await self._tune_search(conn, limit)
                    rows = await (await conn.execute(query, params)).fetchall()
        return [Hit(float(r[3]), record(r)) for r in rows]

    async def _tune_search(self, conn: psycopg.AsyncConnection[Any], limit: int) -> None:
        """An HNSW scan yields ``ef_search`` candidates before filters: ask for at least
        ``limit``, and (pgvector 0.8+) let it scan on until filters leave ``limit`` rows."""
        ef_search = str(min(max(40, limit), 1000))
        if self._version >= ITERATIVE_SCAN:
            await conn.execute(
                "SELECT set_config('hnsw.ef_search', %s, true), "
                "set_config('hnsw.iterative_scan', 'strict_order', true)",
                (ef_search,),
            )
        else:
            await conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (ef_search,))

    # -- housekeeping -------------------------------------------------------------------
    async def maintain(self, collection: str) -> list[str]:
        """``VACUUM (ANALYZE)``: reclaims the row versions updates and deletes left (an
        HNSW index included) and refreshes the planner's statistics. No REINDEX: pgvector's
        HNSW graph keeps its quality under updates, and a rebuild takes the index away."""
        async with self._session() as conn:
            entry = await self._resolve(conn, collection)
            table = self._ident(entry.table)
            with wrap_errors(self.name, f"vacuum {collection!r}"):
                await conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(table))
        return [f"VACUUM (ANALYZE) {self.schema}.{entry.table}"]

    async def collection_size(self, collection: str) -> int | None:
        async with self._session(read=True) as conn:
            entry = await self._resolve(conn, collection)
            with wrap_errors(self.name, f"size of {collection!r}"):
                cur = await conn.execute(
                    "SELECT pg_total_relation_size(%s::regclass)",
                    (self._ident(entry.table).as_string(conn),),
                )
                row = await cur.fetchone()
        return int(row[0]) if row else None

    # -- aliases ------------------------------------------------------------------------
    async def set_alias(self, alias: str, collection: str) -> None:
        async with self._session() as conn:
            with wrap_errors(self.name, f"point alias {alias!r} at {collection!r}"):
                async with conn.transaction():
                    await self._lock_schema(conn)
                    catalog = await self._catalog(conn)
                    physical, aliases = split(catalog)
                    check_set_alias(self.name, alias, collection, physical, aliases)
                    if aliases.get(alias) == collection:
                        return
                    view = catalog[alias].table if alias in catalog else table_name(alias)
                    if alias not in catalog:
                        await self._check_free(conn, view, f"make {alias!r} an alias")
                    previous = catalog.get(aliases.get(alias, ""))
                    if previous is not None and previous.dimension != catalog[collection].dimension:
                        # a view cannot change a column's type (vector(384) to vector(768))
                        # in place: drop it and create it anew, in this same transaction
                        await self._drop_view(conn, view, alias, previous, catalog[collection])
                    await conn.execute(  # in place: views of readers built on it stay
                        sql.SQL("CREATE OR REPLACE VIEW {} AS SELECT * FROM {}").format(
                            self._ident(view), self._ident(catalog[collection].table)
                        )
                    )
                    await conn.execute(
                        self._describe(Entry(name=alias, table=view, alias_of=collection))
                    )

    async def _drop_view(
        self, conn: psycopg.AsyncConnection[Any], view: str, alias: str, old: Entry, new: Entry
    ) -> None:
        try:
            async with conn.transaction():  # a savepoint: the error below is ours to word
                await conn.execute(sql.SQL("DROP VIEW {}").format(self._ident(view)))
        except psycopg.errors.DependentObjectsStillExist as exc:
            detail = (exc.diag.message_detail or "").replace("\n", "; ")
            raise PermanentError(
                f"sink {self.name!r}: cannot point alias {alias!r} at {new.name!r}: its "
                f"vectors have {new.dimension} dimensions, not {old.dimension}, and other views "
                f"depend on the view {self.schema}.{view} ({detail}); drop them, swap, and "
                "create them again"
            ) from exc

    async def alias_target(self, alias: str) -> str | None:
        async with self._session() as conn:
            entry = (await self._catalog(conn, [alias])).get(alias)
        return entry.alias_of if entry is not None else None

    async def is_alias(self, name: str) -> bool:
        return await self.alias_target(name) is not None

    async def rename_collection(self, old: str, new: str) -> None:
        async with self._session() as conn:
            with wrap_errors(self.name, f"rename {old!r} to {new!r}"):
                async with conn.transaction():
                    await self._lock_schema(conn)
                    catalog = await self._catalog(conn)
                    physical, aliases = split(catalog)
                    check_rename(self.name, old, new, physical, aliases)
                    await self._rename(conn, catalog[old], new)

    async def _rename(self, conn: psycopg.AsyncConnection[Any], entry: Entry, new: str) -> None:
        table = table_name(new)
        await self._check_free(conn, table, f"rename {entry.name!r} to {new!r}")
        await conn.execute(
            sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                self._ident(entry.table), sql.Identifier(table)
            )
        )
        for part in ("pkey", "hnsw", "payload"):
            await conn.execute(
                sql.SQL("ALTER INDEX IF EXISTS {} RENAME TO {}").format(
                    self._ident(derived_name(entry.table, part)),
                    sql.Identifier(derived_name(table, part)),
                )
            )
        await conn.execute(
            self._describe(
                Entry(name=new, table=table, dimension=entry.dimension, distance=entry.distance)
            )
        )

    async def drop_collection(self, name: str) -> None:
        async with self._session() as conn:
            with wrap_errors(self.name, f"drop collection {name!r}"):
                async with conn.transaction():
                    await self._lock_schema(conn)
                    catalog = await self._catalog(conn)
                    check_drop(self.name, name, split(catalog)[1])
                    if name in catalog:
                        await conn.execute(
                            sql.SQL("DROP TABLE {}").format(self._ident(catalog[name].table))
                        )

    async def collections(self) -> list[str]:
        async with self._session() as conn:
            return sorted(split(await self._catalog(conn))[0])
