"""SurrealDB source: records of tables, captured with SurrealDB's change feeds.

``setup`` puts a change feed on every mapped table (``CHANGEFEED <retention> INCLUDE
ORIGINAL``, by redefining the table as it is) and ``read_changes`` reads them with
``SHOW CHANGES FOR TABLE t SINCE <versionstamp>``. A position is the versionstamp of a
change's transaction (as SDK 2 reports it: shifted left 16 bits) plus the change's index
inside that transaction, so a batch may end inside a transaction and the next one resumes
there.

Snapshot, re-snapshot and replay keys go through a change feed of our own, on the table
``vectorsync_feed``: one record per page of keys, so they take their place in commit order
beside the application's changes. That table also carries the witness of a lost feed:

* an *origin* entry is written when capture is installed (and anew after a gap);
* a *beat* entry every ``beat_interval`` seconds while reading, and as ``head``'s fence.

SurrealDB drops change-feed entries older than the retention without telling a reader: a
``SINCE`` below the oldest kept entry just starts there. Every table has the same
retention, so while one of our entries at or below our position survives (the origin, a
beat, or a beat with nothing to read between our position and it), nothing after our
position was dropped; each read checks that after reading. Otherwise the feed expired
past us: the source says so (a warning), starts a new epoch with a new origin, a
``truncate`` per table (the worker re-reads every key it holds: rows deleted meanwhile go)
and a snapshot of every table — never a silent gap.

``SHOW CHANGES … LIMIT n`` covers n versionstamps of the whole database (every commit
counts, on any table), so feeds are read in windows up to the newest versionstamp known.

Connections: ``ws://``/``wss://`` servers are opened here (with credentials); an embedded
engine (``mem://``, ``surrealkv://path``) lives in one process and its file cannot be
shared by two, so the application hands its open connection to the engine
(``Engine.open(config, connections={"kb": db})``). Sync (``Surreal``) and async
(``AsyncSurreal``) connections both work: a sync one is called on a thread of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

from .._blocking import BlockingLane
from ..errors import ConfigError, PermanentError, SourceError
from ..model import Change, Key, Op
from ..redact import redact
from ..related import EDGE, RelatedRecord, Relation, key_order
from .base import Backlog, TableSpec
from .cypher import column_types

__all__ = [
    "CAPTURE_TABLE",
    "FEED_TABLE",
    "SurrealDBSource",
    "delete_statement",
    "feed_entry",
    "plain",
    "share",
    "unshare",
    "upsert_statement",
]

logger = logging.getLogger(__name__)

FEED_TABLE = "vectorsync_feed"  # our own change feed: snapshot pages, origins, beats
CAPTURE_TABLE = "vectorsync_capture"  # one record per vectorsync source: what is installed
PAGE = 1000  # keys per snapshot page
WINDOW = 1000  # SHOW CHANGES' LIMIT: a range of the database's versionstamps, capped at 1000
SAMPLE = 1000
_SUB = 1 << 16  # SDK 2 shifts versionstamps left 16 bits: the low bits number the changes
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BACKLOG_CAP = 10_000
# the field named $c as a plain value: a record link compares as the linked record's key
_PLAIN_FIELD = (
    "(IF type::is::record(type::field($c)) THEN record::id(type::field($c)) "
    "ELSE type::field($c) END)"
)
# ops of our feed entries that are changes (origin and beat entries are witnesses)
_OUR_OPS = frozenset({"snapshot", "replay", "truncate", "insert", "update", "delete"})


def ident(name: str) -> str:
    """A table name for SurrealQL text (``SHOW CHANGES`` takes no parameter)."""
    if not _IDENT.fullmatch(name):
        raise ConfigError(
            f"SurrealDB table {name!r}: use a plain name (letters, digits, underscore)"
        )
    return f"`{name}`"


def plain(value: Any) -> Any:
    """A SurrealDB value as a JSON-friendly Python value; a record link is its key."""
    from surrealdb import RecordID

    if isinstance(value, RecordID):
        return plain(value.id)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    return str(value)


def _key(value: Any) -> Key | None:
    from surrealdb import RecordID

    if isinstance(value, RecordID):
        value = value.id
    return value if isinstance(value, int | str) and not isinstance(value, bool) else None


_shared: dict[str, Any] = {}


def share(url: str, connection: Any) -> None:
    """Make ``connection`` (the application's open embedded SurrealDB at ``url``) the one
    every SurrealDB source of that url reads through in this process, for engines opened
    without ``connections=``. An embedded file cannot be opened twice, so the engine must
    not open its own."""
    _shared[url] = connection


def unshare(url: str) -> None:
    _shared.pop(url, None)


def feed_entry(
    source: str, op: str, table: str = "", keys: Sequence[Key] = ()
) -> tuple[str, dict[str, Any]]:
    """SurrealQL appending keys to ``source``'s own feed, as changes ``op`` of ``table``
    (snapshot pages, replays; tests inject raw changes this way)."""
    entry = {"source": source, "op": op, "t": table, "keys": list(keys)}
    return "CREATE type::table($f) CONTENT $e", {"f": FEED_TABLE, "e": entry}


def upsert_statement(table: str, row: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """SurrealQL creating or replacing the record ``row["id"]`` of ``table`` (the write
    side tests and a writer share)."""
    body = {k: v for k, v in row.items() if k != "id"}
    return "UPSERT type::thing($t, $k) CONTENT $c", {"t": table, "k": row["id"], "c": body}


def delete_statement(table: str, key: Key) -> tuple[str, dict[str, Any]]:
    return "DELETE type::thing($t, $k)", {"t": table, "k": key}


_CHANGEFEED = re.compile(r"\s+CHANGEFEED\s+\S+(\s+INCLUDE\s+ORIGINAL)?", re.IGNORECASE)


def with_feed(definition: str, feed: str) -> str:
    """A table's ``DEFINE TABLE`` text (as ``INFO FOR DB`` shows it) made an overwrite
    with the change feed clause ``feed`` in place of the one it had."""
    text = _CHANGEFEED.sub("", definition.strip())
    text = re.sub(
        r"^DEFINE\s+TABLE\s+(OVERWRITE\s+|IF\s+NOT\s+EXISTS\s+)?", "DEFINE TABLE OVERWRITE ", text
    )
    if not feed:
        return text
    at = text.find(" PERMISSIONS")
    if at < 0:
        at = text.find(" COMMENT")
    return f"{text} {feed}" if at < 0 else f"{text[:at]} {feed}{text[at:]}"


@contextlib.contextmanager
def wrap_errors(what: str, who: str) -> Iterator[None]:
    """A lost connection is retryable; a refused statement (ERR, parse error) permanent."""
    from surrealdb.errors import ConnectionUnavailableError

    try:
        yield
    except (ConnectionUnavailableError, ConnectionError, OSError, TimeoutError) as exc:
        raise SourceError(f"{who}: {what}: {redact(str(exc))}", code="ECONNREFUSED") from exc
    except (PermanentError, SourceError):
        raise
    except Exception as exc:
        raise PermanentError(f"{who}: {what}: {redact(str(exc))}") from exc


class _Client:
    """One SurrealDB connection, sync or async, as a list of statement results."""

    def __init__(self, conn: Any, who: str) -> None:
        self.conn = conn
        self._who = who
        self._lane = None if inspect.iscoroutinefunction(conn.query_raw) else BlockingLane(who)

    async def run(self, what: str, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
        with wrap_errors(what, self._who):
            if self._lane is None:
                reply = await self.conn.query_raw(sql, params or {})
            else:
                reply = await self._lane.run(self.conn.query_raw, sql, params or {})
            if "error" in reply:
                raise PermanentError(f"{self._who}: {what}: {reply['error']}")
            results: list[Any] = []
            for r in reply.get("result", []):
                if r.get("status") != "OK":
                    raise PermanentError(f"{self._who}: {what}: {r.get('result')}")
                results.append(r.get("result"))
            return results

    def close(self) -> None:
        if self._lane is not None:
            self._lane.shutdown()


class SurrealDBSource:
    def __init__(
        self,
        name: str,
        url: str = "mem://",
        *,
        namespace: str,
        database: str,
        username: str | None = None,
        password: str | None = None,
        retention: str = "7d",
        beat_interval: float = 60.0,
        poll_interval: float = 0.2,
        connection: Any = None,
    ) -> None:
        self.name = name
        self.url = url
        self.namespace = namespace
        self.database = database
        self.retention = retention
        self.beat_interval = beat_interval
        self.poll_interval = poll_interval
        self._username = username
        self._password = password
        self._given = connection
        self._client: _Client | None = None
        self._owned: Any = None
        self._who = f"source {name!r}"
        self._state: dict[str, Any] = {}  # this source's vectorsync_capture record
        self._last_beat = 0.0
        self._beat_vs = 0  # versionstamp of the newest beat written (0: none yet)
        self._dirty = False  # the capture record changed while reading
        self.expired = 0  # times the feed was found expired past our position
        self._tip = 0  # the newest versionstamp seen or written by us
        self._skip = [-1, 0]  # [floor, window start] of the empty windows read_changes read

    def __repr__(self) -> str:
        return f"SurrealDBSource({self.name!r}, {redact(self.url)!r})"

    # -- connection -----------------------------------------------------------------------
    async def open(self) -> None:
        if importlib.util.find_spec("surrealdb") is None:
            raise ConfigError(
                f"{self._who}: kind 'surrealdb' needs the surrealdb extra: "
                "pip install 'vectorsync[surrealdb]'"
            )
        given = self._given if self._given is not None else _shared.get(self.url)
        if given is not None:
            self._client = _Client(given, self._who)
            ns, db = (await self._run("read the session", "RETURN [session::ns(), session::db()]"))[
                0
            ]
            if (ns, db) != (self.namespace, self.database):
                raise ConfigError(
                    f"{self._who}: the connection handed over uses namespace {ns!r}, database "
                    f"{db!r}; the config says {self.namespace!r}, {self.database!r}"
                )
        else:
            self._client = _Client(await self._connect(), self._who)
        await self._load()

    async def _connect(self) -> Any:
        if not self.url.startswith(("ws://", "wss://")):
            raise ConfigError(
                f"{self._who}: an embedded SurrealDB ({redact(self.url)}) lives in the "
                "application's process; hand vectorsync its open connection: "
                'Engine.open(config, connections={"' + self.name + '": db}), or '
                "vectorsync.sources.surrealdb.share(url, db) once for the whole process"
            )
        from surrealdb import AsyncSurreal

        db: Any = AsyncSurreal(self.url)
        with wrap_errors(f"connect to {redact(self.url)}", self._who):
            await db.connect()
            if self._username is not None:
                await db.signin({"username": self._username, "password": self._password or ""})
            await db.use(self.namespace, self.database)
        self._owned = db
        return db

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
        owned, self._owned = self._owned, None
        if owned is not None:
            with contextlib.suppress(Exception):
                await owned.close()

    async def _run(self, what: str, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
        if self._client is None:
            raise RuntimeError("source is not open")
        return await self._client.run(what, sql, params)

    async def query(self, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
        """Run SurrealQL on the source's connection; one result per statement (the write
        side: tests and a writer run ``upsert_statement``/``delete_statement`` here)."""
        return await self._run("run a statement", sql, params)

    async def _load(self) -> None:
        found = await self._run(
            "read the capture record",
            "SELECT * FROM type::thing($c, $n)",
            {"c": CAPTURE_TABLE, "n": self.name},
        )
        self._state = dict(found[0][0]) if found and found[0] else {}
        self._state.pop("id", None)
        known = [
            self._state.get("origin"),
            self._state.get("acked"),
            *(self._state.get("witnesses") or []),
        ]
        self._tip = max([self._tip, *(int(v) for v in known if v)])

    async def _save(self) -> None:
        await self._run(
            "write the capture record",
            "UPSERT type::thing($c, $n) CONTENT $s",
            {"c": CAPTURE_TABLE, "n": self.name, "s": self._state},
        )

    @property
    def _tables(self) -> dict[str, str]:
        return dict(self._state.get("tables") or {})

    @property
    def _edges(self) -> set[str]:
        return set(self._state.get("edges") or ())

    # -- tables ---------------------------------------------------------------------------
    async def _table_names(self) -> list[str]:
        info = (await self._run("list tables", "INFO FOR DB"))[0]
        return sorted(
            t for t in (info or {}).get("tables", {}) if t not in (FEED_TABLE, CAPTURE_TABLE)
        )

    async def columns(self, table: str) -> dict[str, str]:
        tables = await self._table_names()
        if table not in tables:
            raise ConfigError(
                f"source {self.name!r}: table {table!r} not found in SurrealDB "
                f"{self.namespace}/{self.database} (tables: {', '.join(tables) or 'none'})"
            )
        rows = (
            await self._run(f"sample {table!r}", f"SELECT * FROM {ident(table)} LIMIT {SAMPLE}")
        )[0]
        return column_types({k: plain(v) for k, v in r.items()} for r in rows)

    async def check_key(self, spec: TableSpec) -> None:
        if spec.key != "id":
            raise ConfigError(
                f"source {self.name!r}: SurrealDB records of {spec.table!r} are keyed by "
                f'their record id; use key = "id" (not {spec.key!r})'
            )

    async def setup(self, tables: Sequence[TableSpec]) -> list[str]:
        for spec in tables:
            await self.check_key(spec)
            ident(spec.table)
        registered = self._tables
        new = [s for s in tables if registered.get(s.table) != s.key]
        if not new:
            return []
        await self._define_feed()
        if not registered:  # installed anew: an origin before any change we will read
            self._state = {"epoch": uuid.uuid4().hex, "acked": 0, "tables": {}}
            self._state["origin"] = await self._origin()
        for spec in new:
            await self._define(spec.table, f"CHANGEFEED {self.retention} INCLUDE ORIGINAL")
        for spec in new:
            if spec.edge:  # its changes only fan out to the records built through it
                self._state["edges"] = sorted({*self._edges, spec.table})
            else:
                await self.resnapshot(spec)
            self._state["tables"] = {**self._tables, spec.table: spec.key}
            await self._save()
        return [s.table for s in new]

    async def _define_feed(self) -> None:
        await self._run(
            "define vectorsync's tables",
            f"DEFINE TABLE IF NOT EXISTS {ident(CAPTURE_TABLE)} SCHEMALESS; "
            f"DEFINE TABLE IF NOT EXISTS {ident(FEED_TABLE)} SCHEMALESS "
            f"CHANGEFEED {self.retention}",
        )

    async def _define(self, table: str, feed: str) -> None:
        """Redefine ``table`` as it is, with the change feed clause ``feed`` (or none).
        ``ALTER TABLE … CHANGEFEED`` does not take effect on a table SurrealDB 2.3 created
        implicitly (by a first write), so the definition is overwritten instead."""
        info = (await self._run("list tables", "INFO FOR DB"))[0] or {}
        definition = info.get("tables", {}).get(table) or f"DEFINE TABLE {ident(table)} SCHEMALESS"
        await self._run(f"set the change feed of {table!r}", with_feed(definition, feed))

    async def teardown(self) -> None:
        for table in self._tables:
            await self._define(table, "")
        await self._run(
            "remove the capture record",
            "DELETE type::thing($c, $n); DELETE type::table($f) WHERE source = $n",
            {"c": CAPTURE_TABLE, "n": self.name, "f": FEED_TABLE},
        )
        self._state = {}

    async def epoch(self) -> str:
        await self._load()
        return str(self._state.get("epoch", "")) if self._tables else ""

    # -- our feed entries -----------------------------------------------------------------
    async def _entry(self, op: str, table: str = "", keys: Sequence[Key] = ()) -> None:
        await self._run(f"write a {op} entry", *feed_entry(self.name, op, table, keys))

    async def _witness_entry(self, op: str) -> int:
        """Write an ``op`` entry (origin, beat) and find its versionstamp: everything
        committed before this call is below it."""
        nonce = uuid.uuid4().hex
        await self._entry(op, nonce)
        start = max(self._tip, int(self._state.get("origin") or 0)) >> 16
        while True:
            txs = (await self._run("find our entry", self._show(FEED_TABLE, start, WINDOW)))[0]
            for tx in txs:
                for c in tx["changes"]:
                    body = c.get("update")
                    if isinstance(body, dict) and body.get("t") == nonce:
                        self._tip = max(self._tip, int(tx["versionstamp"]))
                        return int(tx["versionstamp"])
            start += WINDOW

    async def _origin(self) -> int:
        return await self._witness_entry("origin")

    async def resnapshot(self, spec: TableSpec) -> None:
        async for page in self._key_pages(spec.table):
            await self._entry("snapshot", spec.table, page)

    async def enqueue(self, table: str, keys: Sequence[Key]) -> None:
        for i in range(0, len(keys), PAGE):
            await self._entry("replay", table, keys[i : i + PAGE])

    async def _key_pages(self, table: str) -> AsyncIterator[list[Key]]:
        page: list[Key] = []
        async for row in self.scan(table, "id", page=PAGE):
            page.append(row["id"])
            if len(page) == PAGE:
                yield page
                page = []
        if page:
            yield page

    # -- the feed -------------------------------------------------------------------------
    @staticmethod
    def _show(table: str, since: int, limit: int) -> str:
        return f"SHOW CHANGES FOR TABLE {ident(table)} SINCE {since} LIMIT {limit}"

    def _floor(self, after: int) -> int:
        """Changes above this are ours to read: past the acknowledged ones and the origin."""
        origin = int(self._state.get("origin") or 0)
        return max(after, int(self._state.get("acked") or 0), origin - 1)

    def _witness(self, floor: int) -> int:
        """Our newest feed entry whose survival proves nothing after ``floor`` was dropped:
        the origin, a beat at or below ``floor``, or a beat with nothing to read before it."""
        quiet = self._state.get("quiet") or [0, 0]
        if quiet[0] == floor:
            return int(quiet[1])
        beats = [int(w) for w in self._state.get("witnesses") or [] if int(w) <= floor]
        return max([int(self._state.get("origin") or 0), *beats])

    async def _transactions(
        self, floor: int, skip: list[int] | None = None
    ) -> tuple[list[Change], bool]:
        """Changes above ``floor`` in position order, and whether the feed still holds
        everything after ``floor``. ``SHOW CHANGES … LIMIT n`` covers n versionstamps of
        the whole database, so windows are read until changes turn up, or past every
        versionstamp known (``_tip``: newest seen or written by us). ``skip``: [floor,
        window] where the last empty read from that floor ended (the caller's own)."""
        skip = self._skip if skip is None else skip
        feeds = [*self._tables, FEED_TABLE]
        start = floor >> 16
        if skip[0] == floor:  # empty windows read by the last call from here
            start = max(start, skip[1])
        witness = self._witness(floor)
        changes: list[Change] = []
        for _ in range(16):
            statements = [self._show(t, start, WINDOW) for t in feeds]
            statements.append(self._show(FEED_TABLE, witness >> 16, 1))  # read last
            *reads, kept = await self._run("read change feeds", "; ".join(statements))
            txs = sorted(
                (tx for txs in reads for tx in txs), key=lambda tx: int(tx["versionstamp"])
            )
            for tx in txs:
                self._tip = max(self._tip, int(tx["versionstamp"]))
                changes.extend(self._decode(tx, floor))
            start += WINDOW
            intact = any(int(tx["versionstamp"]) == witness for tx in kept)
            if not intact or changes or (start << 16) > self._tip:
                break
        if intact and not changes:
            # only what is known committed (up to the tip) is known empty: later windows
            # may still take commits
            skip[:] = [floor, min(start, (self._tip >> 16) + 1)]
            if floor < self._beat_vs < (start << 16) and self._witness(floor) != self._beat_vs:
                # nothing to read after floor, up to a beat: that stretch is known empty
                self._state["quiet"] = [floor, self._beat_vs]
                self._dirty = True
        return changes, intact

    def _decode(self, tx: Mapping[str, Any], floor: int) -> list[Change]:
        vs = int(tx["versionstamp"])
        at = time.time()  # SurrealDB 2 keeps no commit time in its change feed
        out: list[Change] = []
        for i, c in enumerate(tx["changes"]):
            position = vs + min(i, _SUB - 1)
            if position <= floor:
                continue
            out.extend(self._change(c, position, at))
        return out

    def _change(self, c: Mapping[str, Any], position: int, at: float) -> list[Change]:
        if "delete" in c:
            body, op = c["delete"], "delete"
        elif isinstance(c.get("update"), dict):
            body, op = c["update"], "insert"
        elif "current" in c:
            body, op = c["current"], "update"
        else:
            return []  # define_table and the like
        rid = body.get("id")
        table = getattr(rid, "table_name", "")
        if table == FEED_TABLE:
            if op != "insert" or body.get("source") != self.name or body.get("op") not in _OUR_OPS:
                return []
            ours: Op = body["op"]
            t = str(body.get("t"))
            keys = [""] if ours == "truncate" else body.get("keys") or []
            return [
                Change(table=t, key=k, op=ours, position=position, committed_at=at) for k in keys
            ]
        key = _key(rid)
        if key is None or table not in self._tables:
            return []
        if table in self._edges:  # a delete holds only the edge's id: found by it in deps
            key, op = edge_key(table, key), "update"
        kind: Op = op  # type: ignore[assignment]
        return [Change(table=table, key=key, op=kind, position=position, committed_at=at)]

    async def read_changes(self, after: int, limit: int) -> list[Change]:
        if self._tables and time.monotonic() - self._last_beat >= self.beat_interval:
            await self._beat()  # busy or idle, witnesses keep coming
        self._dirty = False
        floor = self._floor(after)
        changes, intact = await self._transactions(floor)
        if not intact:
            await self._expired(floor)
            return []
        if self._dirty:
            await self._save()
        if len(changes) <= limit:
            return changes
        end = limit  # never inside one position: a snapshot page's keys share it
        while end < len(changes) and changes[end].position == changes[limit - 1].position:
            end += 1
        return changes[:end]

    async def _expired(self, floor: int) -> None:
        """The feed lost changes after ``floor``: capture starts over as a new epoch (the
        worker follows it from its start) with a ``truncate`` per table — every key the
        state store holds is re-read, so rows deleted meanwhile go — and a snapshot."""
        logger.warning(
            "source %s: the SurrealDB change feed expired past position %d (retention %s); "
            "re-snapshotting every table",
            self.name,
            floor,
            self.retention,
            extra={"action": "feed_expired", "source": self.name},
        )
        await self._define_feed()
        self._state.update(epoch=uuid.uuid4().hex, acked=0, quiet=None, witnesses=[])
        self._state["origin"] = await self._origin()
        if not self._state["origin"]:  # else every read would find the feed expired again
            raise PermanentError(
                f"{self._who}: table {FEED_TABLE!r} keeps no change feed; run `vectorsync "
                "teardown` then `vectorsync setup`"
            )
        for table in self._tables:
            await self._entry("truncate", table)
            await self.resnapshot(TableSpec(table=table, key="id"))
        await self._save()
        self.expired += 1

    async def head(self) -> int:
        """The newest change committed before this call: a beat is written as a fence and
        the feeds read up to it. With nothing to read, the acknowledged position (not the
        floor: a floor at the origin is no position a sync ever reaches)."""
        if not self._tables:
            return 0
        fence = await self._beat()
        newest, floor, skip = 0, self._floor(0), [-1, 0]
        while True:
            changes, intact = await self._transactions(floor, skip)
            if not changes:
                if not intact or (skip[1] << 16) > fence:
                    return newest or int(self._state.get("acked") or 0)
                continue
            newest = floor = changes[-1].position

    async def _beat(self) -> int:
        self._last_beat = time.monotonic()
        self._beat_vs = await self._witness_entry("beat")
        beats = [*(self._state.get("witnesses") or []), self._beat_vs][-20:]
        self._state["witnesses"] = beats
        await self._save()
        return self._beat_vs

    async def wait(self, timeout: float) -> None:
        await asyncio.sleep(min(timeout, self.poll_interval))  # change feeds are polled

    async def ack(self, position: int) -> None:
        if position > int(self._state.get("acked") or 0):
            self._state["acked"] = position
            await self._save()

    async def backlog(self, after: int) -> Backlog:
        count, floor, skip = 0, self._floor(after), [-1, 0]
        while count < _BACKLOG_CAP:
            changes, intact = await self._transactions(floor, skip)
            if not changes:
                if not intact or (skip[1] << 16) > self._tip:
                    break
                continue
            count += len(changes)
            floor = changes[-1].position
        return Backlog(changes=count, oldest_committed_at=time.time() if count else None)

    # -- reads ----------------------------------------------------------------------------
    def _row(self, record: Mapping[str, Any]) -> dict[str, Any]:
        return {k: (_key(v) if k == "id" else plain(v)) for k, v in record.items()}

    async def fetch(self, table: str, key: str, keys: Sequence[Key]) -> dict[Key, dict[str, Any]]:
        from surrealdb import RecordID

        found: dict[Key, dict[str, Any]] = {}
        for i in range(0, len(keys), PAGE):
            ids = [RecordID(table, k) for k in keys[i : i + PAGE]]
            rows = (await self._run(f"re-read {table!r}", "SELECT * FROM $ids", {"ids": ids}))[0]
            for r in rows:
                row = self._row(r)
                if row["id"] is not None:
                    found[row["id"]] = row
        return found

    async def scan(
        self, table: str, key: str, *, page: int = 5000, after: Key | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        from surrealdb import RecordID

        t = ident(table)
        while True:
            where = "" if after is None else "WHERE id > $after "
            rows = (
                await self._run(
                    f"scan {table!r}",
                    f"SELECT * FROM {t} {where}ORDER BY id LIMIT {int(page)}",
                    {"after": None if after is None else RecordID(table, after)},
                )
            )[0]
            for r in rows:
                row = self._row(r)
                if row["id"] is not None:
                    yield row
            if len(rows) < page:
                return
            after = _key(rows[-1]["id"])

    async def related(
        self, owner: TableSpec, rel: Relation, keys: Sequence[Key]
    ) -> dict[Key, list[RelatedRecord]]:
        """Record links: related records whose ``on[0]`` equals the owner's ``on[1]``
        (a link field reads as the linked record's key); graph edges: the records at the
        other end of the owner's edges of ``rel.edge``."""
        if rel.edge is not None:
            return await self._across_edges(owner, rel, keys)
        assert rel.on is not None
        rc, oc = rel.on
        owners = await self.fetch(owner.table, owner.key, keys)
        values = {row.get(oc) for row in owners.values()} - {None}
        candidates = await self._related_rows(rel, rc, [v for v in values if _key(v) is not None])
        found: dict[Key, list[RelatedRecord]] = {}
        for key, row in owners.items():
            value = row.get(oc)
            for r in candidates:
                if value is not None and r.get(rc) == value:
                    fields = {out: r.get(column) for out, column in rel.fields}
                    found.setdefault(key, []).append((r[rel.key], fields))
        return found

    async def _related_rows(
        self, rel: Relation, column: str, values: list[Any]
    ) -> list[dict[str, Any]]:
        if not values:
            return []
        if column == "id":
            return list((await self.fetch(rel.table, "id", values)).values())
        rows = (
            await self._run(
                f"read {rel.name!r}",
                f"SELECT * FROM {ident(rel.table)} WHERE {_PLAIN_FIELD} IN $v",
                {"c": column, "v": values},
            )
        )[0]
        return [self._row(r) for r in rows]

    async def _edges_of(
        self, rel: Relation, side: str, table: str, keys: Sequence[Key]
    ) -> list[dict[str, Any]]:
        """The edges of ``rel.edge`` whose ``side`` (in / out) is one of these records."""
        from surrealdb import RecordID

        assert rel.edge is not None
        found: list[dict[str, Any]] = []
        for i in range(0, len(keys), PAGE):
            ends = [RecordID(table, k) for k in keys[i : i + PAGE]]
            found += (
                await self._run(
                    f"read the {rel.edge!r} edges of {table!r}",
                    f"SELECT id, in, out FROM {ident(rel.edge)} WHERE {side} IN $ends",
                    {"ends": ends},
                )
            )[0]
        return found

    def _sides(self, rel: Relation) -> tuple[str, str]:
        """(the owner's side of an edge, the related record's side)."""
        return ("out", "in") if rel.edge_in else ("in", "out")

    async def _across_edges(
        self, owner: TableSpec, rel: Relation, keys: Sequence[Key]
    ) -> dict[Key, list[RelatedRecord]]:
        assert rel.edge is not None
        near, far = self._sides(rel)
        edges = [
            e
            for e in await self._edges_of(rel, near, owner.table, keys)
            if getattr(e[far], "table_name", "") == rel.table
        ]
        ends = {k for e in edges if (k := _key(e[far])) is not None}
        records = await self.fetch(rel.table, rel.key, sorted(ends, key=key_order))
        found: dict[Key, list[RelatedRecord]] = {}
        for e in edges:
            mine, theirs, eid = _key(e[near]), _key(e[far]), _key(e["id"])
            if mine is None or theirs is None or eid is None or theirs not in records:
                continue
            fields = {out: records[theirs].get(column) for out, column in rel.fields}
            fields[EDGE] = edge_key(rel.edge, eid)
            found.setdefault(mine, []).append((theirs, fields))
        return found

    async def dependents(
        self, owner: TableSpec, rel: Relation, related_keys: Sequence[Key]
    ) -> list[Key]:
        if rel.edge is not None:
            return await self._edge_dependents(owner, rel, related_keys)
        assert rel.on is not None
        rc, oc = rel.on
        values: list[Any] = list(related_keys)
        if rc != rel.key:
            rows = await self.fetch(rel.table, rel.key, related_keys)
            values = [r.get(rc) for r in rows.values() if r.get(rc) is not None]
        if not values:
            return []
        rows = (
            await self._run(
                f"find records depending on {rel.table!r}",
                f"SELECT id FROM {ident(owner.table)} WHERE {_PLAIN_FIELD} IN $v",
                {"c": oc, "v": values},
            )
        )[0]
        return [k for r in rows if (k := _key(r["id"])) is not None]

    async def _edge_dependents(
        self, owner: TableSpec, rel: Relation, related_keys: Sequence[Key]
    ) -> list[Key]:
        """Owners across ``rel.edge`` now: from changed related records, and from changed
        edges (keys ``<edge>:<id>``; a deleted one is found in the state store's deps)."""
        from surrealdb import RecordID

        assert rel.edge is not None
        near, far = self._sides(rel)
        prefix = f"{rel.edge}:"
        edge_ids = [
            k[len(prefix) :] for k in related_keys if isinstance(k, str) and k.startswith(prefix)
        ]
        records = [k for k in related_keys if not (isinstance(k, str) and k.startswith(prefix))]
        ends: list[Any] = [e[near] for e in await self._edges_of(rel, far, rel.table, records)]
        for i in range(0, len(edge_ids), PAGE):
            ids = [RecordID(rel.edge, k) for k in edge_ids[i : i + PAGE]]
            rows = (
                await self._run(
                    f"read {rel.edge!r} edges", "SELECT id, in, out FROM $ids", {"ids": ids}
                )
            )[0]
            ends += [r[near] for r in rows]
        owners = {
            k
            for end in ends
            if getattr(end, "table_name", "") == owner.table and (k := _key(end)) is not None
        }
        return sorted(owners, key=key_order)


def edge_key(edge: str, key: Key) -> str:
    """How a change of an edge record, and the deps built through it, name the edge."""
    return f"{edge}:{key}"
