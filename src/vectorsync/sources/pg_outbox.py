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
from .postgres import SCHEMA, derived_name, split_table, table_ident, wrap_errors

if TYPE_CHECKING:
    from .postgres import PostgresSource

__all__ = ["OutboxCapture"]

_CLAIM_ALL_CHUNK = 50_000
_PARTS = ("row", "stmt")  # the row trigger records keys; the statement one wakes readers


class OutboxCapture:
    def __init__(self, source: PostgresSource) -> None:
        self.source = source
        cap = source.slot
        self.outbox = sql.Identifier(SCHEMA, derived_name(cap, "outbox"))
        self.seq = sql.Identifier(SCHEMA, derived_name(cap, "pos"))
        self._seq_text = self.seq.as_string(None)  # for to_regclass and nextval
        self._index = sql.Identifier(derived_name(cap, "pos", "idx"))
        self.channel = cap  # at most 63 bytes, as every capture name
        self._triggers = {part: derived_name(cap, part) for part in _PARTS}
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
                await source.check_owner(conn)
                wanted = {s.table: self._trigger_sql(s) for s in tables}
                stale = [s for s in tables if not await self._current(conn, s, wanted[s.table])]
                fresh = not await _exists(conn, self._seq_text)
                if stale or fresh:
                    await self._install(conn, stale, wanted, create_outbox=fresh)
                if not fresh:  # an outbox made before epochs existed gets one now
                    await source.renew_epoch(conn, "outbox", keep=True)
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
        """(Re)install triggers in one transaction, dropping the functions they replace.
        The application tables are locked first, so their writers (which go on to the
        outbox) never wait in a cycle with us."""
        async with conn.transaction():
            if stale:
                listed = sql.SQL(", ").join(table_ident(s.table) for s in stale)
                await conn.execute(
                    sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(listed)
                )
            if create_outbox:
                await self._create_outbox(conn)
            replaced: set[int] = set()
            for spec in stale:
                replaced |= await self._trigger_functions(conn, spec)
                for statement in wanted[spec.table]:
                    await conn.execute(statement)
            await self._drop_unused(conn, replaced)

    async def _create_outbox(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """A new feed: outbox, position sequence, a new epoch, and no snapshot counted
        as done (whatever happened before this outbox is not in it)."""
        await conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {ob} (id bigserial PRIMARY KEY, "
                "tbl text NOT NULL, key text, op text NOT NULL, pos bigint, "
                "committed_at timestamptz NOT NULL DEFAULT clock_timestamp())"
            ).format(ob=self.outbox)
        )
        await conn.execute(
            sql.SQL("CREATE INDEX IF NOT EXISTS {i} ON {ob} (pos)").format(
                i=self._index, ob=self.outbox
            )
        )
        await conn.execute(sql.SQL("CREATE SEQUENCE IF NOT EXISTS {}").format(self.seq))
        await self.source.renew_epoch(conn, "outbox")
        await conn.execute(
            sql.SQL("DELETE FROM {} WHERE capture = %s").format(
                sql.Identifier(SCHEMA, "snapshots")
            ),
            (self.source.slot,),
        )

    async def _trigger_functions(
        self, conn: psycopg.AsyncConnection[Any], spec: TableSpec
    ) -> set[int]:
        """The functions this capture's triggers on the table call now."""
        cur = await conn.execute(
            "SELECT tgfoid FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND tgname IN (%s, %s)",
            (table_ident(spec.table).as_string(conn), *self._triggers.values()),
        )
        return {int(r[0]) for r in await cur.fetchall()}

    async def _drop_unused(self, conn: psycopg.AsyncConnection[Any], oids: set[int]) -> None:
        """Drop those of our functions (in the vectorsync schema) no trigger calls."""
        cur = await conn.execute(
            "SELECT n.nspname, p.proname FROM pg_proc p "
            "JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE p.oid = ANY(%s::oid[]) AND n.nspname = %s "
            "AND NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgfoid = p.oid)",
            (sorted(oids), SCHEMA),
        )
        for schema, name in await cur.fetchall():
            await conn.execute(
                sql.SQL("DROP FUNCTION IF EXISTS {}()").format(sql.Identifier(schema, name))
            )

    async def _current(
        self, conn: psycopg.AsyncConnection[Any], spec: TableSpec, wanted: list[sql.Composed]
    ) -> bool:
        """Whether the table's triggers are installed exactly as ``wanted``: both call
        this capture's functions, whose statements' digest is the row function's comment."""
        row_fn, stmt_fn = (self._fn(spec, part).as_string(conn) + "()" for part in _PARTS)
        cur = await conn.execute(
            "SELECT obj_description(to_regprocedure(%s), 'pg_proc'), "
            "(SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass(%s) "
            "AND ((tgname = %s AND tgfoid = to_regprocedure(%s)) "
            "OR (tgname = %s AND tgfoid = to_regprocedure(%s))))",
            (
                row_fn,
                table_ident(spec.table).as_string(conn),
                self._triggers["row"],
                row_fn,
                self._triggers["stmt"],
                stmt_fn,
            ),
        )
        row = await cur.fetchone()
        return row is not None and row[1] == 2 and row[0] == _digest(wanted[:-1])

    def _fn(self, spec: TableSpec, part: str) -> sql.Identifier:
        """A trigger function: always hashed, as its name joins two varying parts."""
        schema, table = split_table(spec.table)
        return sql.Identifier(
            SCHEMA, derived_name(self.source.slot, schema, table, part, verbatim=False)
        )

    def _trigger_sql(self, spec: TableSpec) -> list[sql.Composed]:
        row_fn, stmt_fn = (self._fn(spec, part) for part in _PARTS)
        k, tbl = sql.Identifier(spec.key), sql.Literal(spec.table)
        insert = sql.SQL("INSERT INTO {ob} (tbl, key, op) VALUES").format(ob=self.outbox)
        row_body = sql.SQL(
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
            "END"
        ).format(ins=insert, tbl=tbl, k=k)
        stmt_body = sql.SQL(
            "BEGIN\n"
            "  IF TG_OP = 'TRUNCATE' THEN {ins} ({tbl}, '', 'truncate'); END IF;\n"
            "  PERFORM pg_notify({ch}, '');\n"
            "  RETURN NULL;\n"
            "END"
        ).format(ins=insert, tbl=tbl, ch=sql.Literal(self.channel))
        # the body is a string literal, not dollar-quoted: a table name may hold any $tag$
        out = [
            sql.SQL(
                "CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS {b}"
            ).format(fn=fn, b=sql.Literal(body.as_string(None)))
            for fn, body in ((row_fn, row_body), (stmt_fn, stmt_body))
        ]
        t = table_ident(spec.table)
        for part, fn, ddl in (
            ("row", row_fn, "AFTER INSERT OR UPDATE OR DELETE ON {t} FOR EACH ROW"),
            (
                "stmt",
                stmt_fn,
                "AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {t} FOR EACH STATEMENT",
            ),
        ):
            trig = sql.Identifier(self._triggers[part])
            out.append(sql.SQL("DROP TRIGGER IF EXISTS {n} ON {t}").format(n=trig, t=t))
            out.append(
                sql.SQL("CREATE TRIGGER {n} " + ddl + " EXECUTE FUNCTION {fn}()").format(
                    n=trig, t=t, fn=fn
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
                    called = await self._drop_triggers(conn)
                    # and functions left by tables dropped since, or by older names
                    cur = await conn.execute(
                        "SELECT p.oid FROM pg_proc p JOIN pg_namespace n "
                        "ON n.oid = p.pronamespace WHERE n.nspname = %s "
                        "AND strpos(p.prosrc, %s) > 0",
                        (SCHEMA, self.outbox.as_string(conn)),
                    )
                    await self._drop_unused(
                        conn, called | {int(r[0]) for r in await cur.fetchall()}
                    )
                    await conn.execute(sql.SQL("DROP TABLE IF EXISTS {ob}").format(ob=self.outbox))
                    await conn.execute(sql.SQL("DROP SEQUENCE IF EXISTS {}").format(self.seq))
                    await self.source.forget_epoch(conn)
        await self.source.forget_snapshots()

    async def _drop_triggers(self, conn: psycopg.AsyncConnection[Any]) -> set[int]:
        """Drop this capture's triggers on every table; the functions they called."""
        cur = await conn.execute(
            "SELECT n.nspname, c.relname, t.tgname, t.tgfoid FROM pg_trigger t "
            "JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE t.tgname IN (%s, %s) AND NOT t.tgisinternal",
            tuple(self._triggers.values()),
        )
        called: set[int] = set()
        for schema, table, trig, fn in await cur.fetchall():
            await conn.execute(
                sql.SQL("DROP TRIGGER IF EXISTS {n} ON {t}").format(
                    n=sql.Identifier(trig), t=sql.Identifier(schema, table)
                )
            )
            called.add(int(fn))
        return called

    async def epoch(self) -> str:
        installed = sql.SQL("to_regclass({}) IS NOT NULL").format(sql.Literal(self._seq_text))
        return await self.source.read_epoch("outbox", installed)

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
            seq_text = sql.Literal(self._seq_text)
            # positions stay above what was applied, even after a teardown reset the sequence
            await conn.execute(
                sql.SQL("SELECT setval({s}, %s) FROM {seq} WHERE last_value < %s").format(
                    s=seq_text, seq=self.seq
                ),
                (after, after),
            )
            cur = await conn.execute(
                sql.SQL(
                    "WITH picked AS (SELECT id FROM {ob} WHERE pos IS NULL ORDER BY id "
                    "LIMIT %s FOR UPDATE SKIP LOCKED) "
                    "UPDATE {ob} o SET pos = nextval({s}) FROM picked WHERE o.id = picked.id"
                ).format(ob=self.outbox, s=seq_text),
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
                if not await _exists(conn, self._seq_text):
                    return 0
                while await self._claim(conn, 0, _CLAIM_ALL_CHUNK) == _CLAIM_ALL_CHUNK:
                    pass
                row = await (
                    await conn.execute(
                        sql.SQL(
                            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {}"
                        ).format(self.seq)
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
                if not await _exists(conn, self._seq_text):
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


async def _exists(conn: psycopg.AsyncConnection[Any], quoted: str) -> bool:
    """Whether the relation named by ``quoted`` (identifier syntax) exists."""
    row = await (await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (quoted,))).fetchone()
    return bool(row and row[0])
