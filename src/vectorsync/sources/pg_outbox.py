"""Trigger outbox capture for PostgreSQL servers without logical replication.

Row triggers write the key of every insert, update and delete to an outbox table in the
application's transaction; a statement trigger sends a NOTIFY that wakes the reader and
records TRUNCATE. Outbox ids come from a sequence *before* commit, so they are not in
commit order and an ``id > last`` cursor would skip late committers. Instead rows are
*claimed*: one claimer at a time (an advisory lock) stamps committed, unclaimed rows with
positions from a second sequence (``FOR UPDATE SKIP LOCKED``). Claims commit in position
order, so ``pos > after`` is a safe cursor over claimed rows; acknowledged rows are deleted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import psycopg
import xxhash
from psycopg import sql

from ..model import Change, Key
from .base import Backlog, TableSpec
from .postgres import SCHEMA, split_table, table_ident, wrap_errors

if TYPE_CHECKING:
    from .postgres import PostgresSource

__all__ = ["OutboxCapture"]

_CLAIM_ALL_CHUNK = 50_000


class OutboxCapture:
    def __init__(self, source: PostgresSource) -> None:
        self.source = source
        cap = source.slot
        self.outbox = sql.Identifier(SCHEMA, f"{cap}_outbox")
        self.seq = f"{SCHEMA}.{cap}_pos"
        self.channel = cap
        self._lock_key = f"vectorsync:{cap}"
        self._listener: psycopg.AsyncConnection[tuple[Any, ...]] | None = None
        self._int_tables: set[str] = set()

    # -- installation ---------------------------------------------------------------------
    async def install(self, source: PostgresSource, tables: Sequence[TableSpec]) -> list[str]:
        for spec in tables:
            await source.check_table(spec, needs_identity=False)
            if (await source.key_type(spec.table, spec.key))[1]:
                self._int_tables.add(spec.table)
        await source.ensure_schema()
        async with source.session() as conn:
            with wrap_errors("install the outbox"):
                wanted = {s.table: self._trigger_sql(s) for s in tables}
                stale = [s for s in tables if not await self._current(conn, s, wanted[s.table])]
                if stale:
                    fresh = not await _exists(conn, self.seq)
                    await self._install(conn, stale, wanted, create_outbox=fresh)
        pending = await source.pending_snapshots(tables)
        for spec in tables:
            if spec.table in pending:
                await source.snapshot_table(spec, pending[spec.table])
        return sorted(pending)

    async def _install(
        self,
        conn: psycopg.AsyncConnection[Any],
        stale: Sequence[TableSpec],
        wanted: dict[str, list[sql.Composed]],
        *,
        create_outbox: bool = False,
    ) -> None:
        """(Re)install triggers in one transaction. The application tables are locked
        first, so their writers (which go on to the outbox) never wait in a cycle with us."""
        async with conn.transaction():
            listed = sql.SQL(", ").join(table_ident(s.table) for s in stale)
            await conn.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(listed))
            if create_outbox:
                await conn.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {ob} (id bigserial PRIMARY KEY, "
                        "tbl text NOT NULL, key text, op text NOT NULL, pos bigint, "
                        "committed_at timestamptz NOT NULL DEFAULT clock_timestamp())"
                    ).format(ob=self.outbox)
                )
                await conn.execute(
                    sql.SQL("CREATE INDEX IF NOT EXISTS {i} ON {ob} (pos)").format(
                        i=sql.Identifier(f"{self.channel}_outbox_pos"), ob=self.outbox
                    )
                )
                await conn.execute(f"CREATE SEQUENCE IF NOT EXISTS {self.seq}")
            for spec in stale:
                for statement in wanted[spec.table]:
                    await conn.execute(statement)

    async def _current(
        self, conn: psycopg.AsyncConnection[Any], spec: TableSpec, wanted: list[sql.Composed]
    ) -> bool:
        """Whether the table's triggers are installed exactly as ``wanted`` (a digest of
        the statements is kept as the row function's comment)."""
        cur = await conn.execute(
            "SELECT obj_description(to_regprocedure(%s), 'pg_proc'), "
            "(SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass(%s) "
            "AND tgname IN (%s, %s))",
            (
                f"{SCHEMA}.{self._fn_name(spec, 'row')}()",
                table_ident(spec.table).as_string(conn),
                f"{self.channel}_row",
                f"{self.channel}_stmt",
            ),
        )
        row = await cur.fetchone()
        return row is not None and row[1] == 2 and row[0] == _digest(wanted[:-1])

    def _fn_name(self, spec: TableSpec, part: str) -> str:
        return f"{self.channel}_{split_table(spec.table)[1]}_{part}"

    def _trigger_sql(self, spec: TableSpec) -> list[sql.Composed]:
        cap = self.channel
        row_fn = sql.Identifier(SCHEMA, self._fn_name(spec, "row"))
        stmt_fn = sql.Identifier(SCHEMA, self._fn_name(spec, "stmt"))
        out: list[sql.Composed] = []
        k, tbl = sql.Identifier(spec.key), sql.Literal(spec.table)
        insert = sql.SQL("INSERT INTO {ob} (tbl, key, op) VALUES").format(ob=self.outbox)
        out.append(
            sql.SQL(
                "CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $f$\n"
                "BEGIN\n"
                "  IF TG_OP = 'INSERT' THEN {ins} ({tbl}, NEW.{k}::text, 'insert');\n"
                "  ELSIF TG_OP = 'UPDATE' THEN\n"
                "    IF OLD.{k} IS DISTINCT FROM NEW.{k} THEN\n"
                "      {ins} ({tbl}, OLD.{k}::text, 'delete');\n"
                "    END IF;\n"
                "    {ins} ({tbl}, NEW.{k}::text, 'update');\n"
                "  ELSE {ins} ({tbl}, OLD.{k}::text, 'delete');\n"
                "  END IF;\n"
                "  RETURN NULL;\n"
                "END $f$"
            ).format(fn=row_fn, ins=insert, tbl=tbl, k=k)
        )
        out.append(
            sql.SQL(
                "CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $f$\n"
                "BEGIN\n"
                "  IF TG_OP = 'TRUNCATE' THEN {ins} ({tbl}, '', 'truncate'); END IF;\n"
                "  PERFORM pg_notify({ch}, '');\n"
                "  RETURN NULL;\n"
                "END $f$"
            ).format(fn=stmt_fn, ins=insert, tbl=tbl, ch=sql.Literal(cap))
        )
        t = table_ident(spec.table)
        for trig, ddl in (
            (f"{cap}_row", "AFTER INSERT OR UPDATE OR DELETE ON {t} FOR EACH ROW"),
            (
                f"{cap}_stmt",
                "AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {t} FOR EACH STATEMENT",
            ),
        ):
            fn = row_fn if trig.endswith("_row") else stmt_fn
            out.append(
                sql.SQL("DROP TRIGGER IF EXISTS {n} ON {t}").format(n=sql.Identifier(trig), t=t)
            )
            out.append(
                sql.SQL("CREATE TRIGGER {n} " + ddl + " EXECUTE FUNCTION {fn}()").format(
                    n=sql.Identifier(trig), t=t, fn=fn
                )
            )
        out.append(
            sql.SQL("COMMENT ON FUNCTION {fn}() IS {d}").format(
                fn=row_fn, d=sql.Literal(_digest(out))
            )
        )
        return out

    async def teardown(self) -> None:
        async with self.source.session() as conn:
            with wrap_errors("remove the outbox"):
                async with conn.transaction():
                    cur = await conn.execute(
                        "SELECT DISTINCT event_object_schema, event_object_table "
                        "FROM information_schema.triggers WHERE trigger_name IN (%s, %s)",
                        (f"{self.channel}_row", f"{self.channel}_stmt"),
                    )
                    for schema, table in await cur.fetchall():
                        for trig in (f"{self.channel}_row", f"{self.channel}_stmt"):
                            await conn.execute(
                                sql.SQL("DROP TRIGGER IF EXISTS {n} ON {t}").format(
                                    n=sql.Identifier(trig), t=sql.Identifier(schema, table)
                                )
                            )
                    cur = await conn.execute(
                        "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n "
                        "ON n.oid = p.pronamespace WHERE n.nspname = %s AND p.proname LIKE %s",
                        (SCHEMA, f"{self.channel}\\_%"),
                    )
                    for (fn,) in await cur.fetchall():
                        await conn.execute(f"DROP FUNCTION IF EXISTS {fn}")
                    await conn.execute(sql.SQL("DROP TABLE IF EXISTS {ob}").format(ob=self.outbox))
                    await conn.execute(f"DROP SEQUENCE IF EXISTS {self.seq}")
        await self.source.forget_snapshots()

    # -- the feed -------------------------------------------------------------------------
    async def write_keys(
        self, conn: psycopg.AsyncConnection[Any], table: str, keys: Sequence[Key], op: str
    ) -> None:
        async with conn.cursor() as cur:
            await cur.executemany(
                sql.SQL("INSERT INTO {ob} (tbl, key, op) VALUES (%s, %s, %s)").format(
                    ob=self.outbox
                ),
                [(table, str(k), op) for k in keys],
            )

    async def _claim(self, conn: psycopg.AsyncConnection[Any], after: int, limit: int) -> int:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self._lock_key,))
            # positions stay above what was applied, even after a teardown reset the sequence
            await conn.execute(
                f"SELECT setval('{self.seq}', %s) FROM {self.seq} WHERE last_value < %s",
                (after, after),
            )
            cur = await conn.execute(
                sql.SQL(
                    "WITH picked AS (SELECT id FROM {ob} WHERE pos IS NULL ORDER BY id "
                    "LIMIT %s FOR UPDATE SKIP LOCKED) "
                    "UPDATE {ob} o SET pos = nextval({seq}) FROM picked WHERE o.id = picked.id"
                ).format(ob=self.outbox, seq=sql.Literal(self.seq)),
                (limit,),
            )
            return cur.rowcount

    async def read_changes(self, after: int, limit: int) -> list[Change]:
        async with self.source.session() as conn:
            query = sql.SQL(
                "SELECT pos, tbl, key, op, extract(epoch FROM committed_at)::float8 FROM {ob} "
                "WHERE pos > %s ORDER BY pos LIMIT %s"
            ).format(ob=self.outbox)
            with wrap_errors("read the outbox"):
                rows = await (await conn.execute(query, (after, limit))).fetchall()
                if len(rows) < limit and await self._claim(conn, after, limit - len(rows)):
                    rows = await (await conn.execute(query, (after, limit))).fetchall()
            ints = self._int_tables
        return [
            Change(
                table=t,
                key=int(k) if t in ints and op != "truncate" else k,
                op=op,
                position=pos,
                committed_at=ts,
            )
            for pos, t, k, op, ts in rows
        ]

    async def head(self) -> int:
        """Claims everything committed so far; the last position is the head."""
        async with self.source.session() as conn:
            with wrap_errors("read the outbox head"):
                if not await _exists(conn, self.seq):
                    return 0
                while await self._claim(conn, 0, _CLAIM_ALL_CHUNK) == _CLAIM_ALL_CHUNK:
                    pass
                row = await (
                    await conn.execute(
                        f"SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {self.seq}"
                    )
                ).fetchone()
        return int(row[0]) if row else 0

    async def ack(self, position: int) -> None:
        async with self.source.session() as conn:
            with wrap_errors("release the outbox"):
                await conn.execute(
                    sql.SQL("DELETE FROM {ob} WHERE pos <= %s").format(ob=self.outbox), (position,)
                )

    async def backlog(self, after: int) -> Backlog:
        async with self.source.session() as conn:
            with wrap_errors("read the backlog"):
                if not await _exists(conn, self.seq):
                    return Backlog(changes=0, oldest_committed_at=None)
                row = await (
                    await conn.execute(
                        sql.SQL(
                            "SELECT count(*), extract(epoch FROM min(committed_at))::float8 "
                            "FROM {ob} WHERE pos IS NULL OR pos > %s"
                        ).format(ob=self.outbox),
                        (after,),
                    )
                ).fetchone()
            assert row is not None
        return Backlog(changes=int(row[0]), oldest_committed_at=row[1])

    async def wait(self, timeout: float) -> None:
        """Return at the next NOTIFY from the capture triggers, or after ``timeout``."""
        try:
            if self._listener is None or self._listener.closed or self._listener.broken:
                self._listener = await self.source.connect()
                await self._listener.execute(
                    sql.SQL("LISTEN {}").format(sql.Identifier(self.channel))
                )
            async for _ in self._listener.notifies(timeout=timeout, stop_after=1):
                pass
        except psycopg.OperationalError:  # the next read reports the outage
            if self._listener is not None:
                await self._listener.close()
            self._listener = None

    async def close(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(psycopg.Error):
                await self._listener.close()
            self._listener = None


def _digest(statements: list[sql.Composed]) -> str:
    text = "\n".join(st.as_string(None) for st in statements)
    return "vectorsync " + xxhash.xxh3_64_hexdigest(text.encode())


async def _exists(conn: psycopg.AsyncConnection[Any], name: str) -> bool:
    row = await (await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,))).fetchone()
    return bool(row and row[0])
