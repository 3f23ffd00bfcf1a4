"""FalkorDB source: a graph whose nodes are the records (a label is a table).

FalkorDB has no change feed, so changes come one of two ways:

* ``capture = "outbox"``: applications write through :class:`vectorsync.graph.GraphWriter`,
  which runs each Cypher write and appends the keys it touched to a Redis stream
  (``vectorsync:<graph>:outbox``) in one MULTI/EXEC. Redis executes a transaction alone
  and logs it whole, so no write is ever without its outbox entry; stream ids grow in
  commit order and are the source position. Entries are trimmed once every vectorsync
  source reading the stream has acknowledged them.
* ``capture = "poll"``: for external writers that set ``version_property = timestamp()``
  on every node they change. Nodes whose version grew are read in version order; deleted
  nodes and edge-only changes are invisible to polling (``vectorsync check --repair``
  finds and fixes them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Literal, TypeVar

import orjson

from ..errors import ConfigError, PermanentError, RetryableError, SourceError
from ..model import Change, Key
from ..redact import redact
from . import cypher
from .base import Backlog, TableSpec
from .cypher import PAGE, GraphSource

__all__ = [
    "FalkorDBSource",
    "connect",
    "decode_entry",
    "disconnect",
    "encode_entry",
    "outbox_key",
    "stream_position",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
_SEQ_BITS = 20  # a stream id "ms-seq" is the position (ms << 20) | seq
_BACKLOG_CAP = 10_000


def outbox_key(graph: str) -> str:
    return f"vectorsync:{graph}:outbox"


def stream_position(entry_id: str) -> int:
    ms, seq = entry_id.split("-")
    if int(seq) >> _SEQ_BITS:
        raise SourceError(f"outbox entry id {entry_id!r}: sequence too large for a position")
    return (int(ms) << _SEQ_BITS) | int(seq)


def _stream_id(position: int) -> str:
    return f"{position >> _SEQ_BITS}-{position & ((1 << _SEQ_BITS) - 1)}"


def encode_entry(label: str, key: Key, op: str, relation: str | None = None) -> dict[str, bytes]:
    return {"c": orjson.dumps({"t": label, "k": key, "op": op, "rel": relation})}


def decode_entry(entry_id: str, fields: dict[str, str]) -> Change:
    body = orjson.loads(fields["c"])
    position = stream_position(entry_id)
    return Change(
        table=body["t"],
        key=body["k"],
        op=body["op"],
        position=position,
        committed_at=(position >> _SEQ_BITS) / 1000.0,
        relation=body.get("rel"),
    )


@contextlib.contextmanager
def wrap_errors(
    what: str, who: str = "falkordb source", retryable: type[RetryableError] = SourceError
) -> Iterator[None]:
    """Connection trouble is retryable; a refused command or query is permanent."""
    import redis.exceptions as rex

    try:
        yield
    except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
        raise retryable(f"{who}: {what}: {exc}", code="ECONNREFUSED") from exc
    except rex.RedisError as exc:
        raise PermanentError(f"{who}: {what}: {exc}") from exc


async def connect(
    url: str,
    who: str,
    retryable: type[RetryableError] = SourceError,
    *,
    timeout: float | None = None,
) -> Any:
    """An async FalkorDB client of ``url``, checked to reach a server with the graph module
    (the FalkorDB source and sink both open theirs here). ``timeout``: seconds a reply may
    take (redis-py's default is 5)."""
    from falkordb.asyncio import FalkorDB

    db: Any = None
    try:
        options = {} if timeout is None else {"socket_timeout": timeout}
        db = FalkorDB.from_url(url, **options)  # may already talk to the server
        await db.connection.ping()
        modules = await db.connection.execute_command("MODULE", "LIST")
    except Exception as exc:
        if db is not None:
            await disconnect(db)
        raise retryable(
            f"{who}: cannot reach FalkorDB at {redact(url)}: {exc}", code="ECONNREFUSED"
        ) from exc
    if not any("graph" in str(m).lower() for m in modules):
        await disconnect(db)
        raise ConfigError(
            f"{who}: {redact(url)} is a Redis server without the FalkorDB module; start it "
            "with --loadmodule <falkordb.so> or use another url"
        )
    return db


async def disconnect(db: Any) -> None:
    await db.aclose()
    await db.connection.connection_pool.disconnect()  # a pool given is not closed


class FalkorDBSource(GraphSource):
    def __init__(
        self,
        name: str,
        url: str,
        graph: str,
        *,
        capture: Literal["outbox", "poll"] = "outbox",
        version_property: str = "updated_at",
        poll_grace: float = 1.0,
    ) -> None:
        self.name = name
        self.url = url
        self.graph_name = graph
        self.capture = capture
        self.version_property = version_property
        self.poll_grace = poll_grace
        self._db: Any = None
        self._tables: dict[str, str] = {}  # captured label → key property
        self._cursor = 0  # the newest position handed out (where wait() blocks from)
        self._graph_exists = False
        self._stream = outbox_key(graph)
        self._registry = f"vectorsync:{graph}:capture:{name}"
        # where this reader's stream starts: entries written before its first snapshot are
        # covered by that snapshot (the sync re-reads current nodes)
        self._floor_key = f"vectorsync:{graph}:floor:{name}"
        self._floor = 0
        self._acked = f"vectorsync:{graph}:acked"

    def __repr__(self) -> str:
        return f"FalkorDBSource({self.name!r}, graph={self.graph_name!r}, {self.capture})"

    # -- connection -----------------------------------------------------------------------
    async def open(self) -> None:
        self._db = await connect(self.url, f"source {self.name!r}")
        self._tables = await self._call(
            "read capture registry", self._redis.hgetall, self._registry
        )
        self._floor = int(await self._call("read floor", self._redis.get, self._floor_key) or 0)

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await disconnect(db)

    @property
    def _redis(self) -> Any:
        if self._db is None:
            raise RuntimeError("source is not open")
        return self._db.connection

    async def _call(self, what: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        with wrap_errors(what):
            return await fn(*args)

    async def query(
        self, what: str, query: str, params: dict[str, Any] | None = None
    ) -> list[list[Any]]:
        """A read-only query's rows (none while the graph does not exist yet)."""
        with wrap_errors(what):
            if not await self._exists():
                return []
            result = await self._db.select_graph(self.graph_name).ro_query(query, params)
        return list(result.result_set)

    async def write(self, what: str, query: str, params: dict[str, Any] | None = None) -> None:
        with wrap_errors(what):
            if await self._exists():
                await self._db.select_graph(self.graph_name).query(query, params)

    async def _exists(self) -> bool:
        if not self._graph_exists:  # reading a graph that does not exist would create it
            self._graph_exists = bool(await self._redis.exists(self.graph_name))
        return self._graph_exists

    # -- tables ---------------------------------------------------------------------------
    async def setup(self, tables: Sequence[TableSpec]) -> list[str]:
        new = [s for s in tables if self._tables.get(s.table) != s.key]
        for spec in new:  # registered below, after its index exists
            await self._index(spec)
        if new and self.capture == "outbox" and not self._tables:
            self._floor = await self.head()
            await self._call("set floor", self._redis.set, self._floor_key, self._floor)
        for spec in new:
            await self.resnapshot(spec)
            await self._call(
                "register capture", self._redis.hset, self._registry, spec.table, spec.key
            )
            self._tables[spec.table] = spec.key
        if self.capture == "outbox" and not await self._call(
            "read ack", self._redis.hexists, self._acked, self.name
        ):
            # register as a reader at once, so no entry is trimmed before our first ack
            await self._call("register reader", self._redis.hset, self._acked, self.name, 0)
        return [s.table for s in new]

    async def _index(self, spec: TableSpec) -> None:
        """A range index on the key property: re-reads are key lookups."""
        query = f"CREATE INDEX FOR (n:{cypher.ident(spec.table)}) ON (n.{cypher.ident(spec.key)})"
        import redis.exceptions as rex

        try:
            with wrap_errors(f"index {spec.table!r}"):
                await self._db.select_graph(self.graph_name).query(query)
        except PermanentError as exc:
            if not isinstance(exc.__cause__, rex.ResponseError) or "already" not in str(exc):
                raise

    async def teardown(self) -> None:
        with wrap_errors("remove capture"):
            await self._redis.delete(self._registry, self._floor_key)
            await self._redis.hdel(self._acked, self.name)
            if not await self._redis.hlen(self._acked):
                await self._redis.delete(self._stream)  # no other reader: drop the outbox
        self._tables = {}

    async def resnapshot(self, spec: TableSpec) -> None:
        if self.capture == "poll":
            await self._touch(spec.table, None)
            return
        async for page in self._key_pages(spec):
            await self._append(spec.table, page, "snapshot")

    async def enqueue(self, table: str, keys: Sequence[Key]) -> None:
        if self.capture == "poll":
            await self._touch(table, list(keys))
            return
        for i in range(0, len(keys), PAGE):
            await self._append(table, keys[i : i + PAGE], "replay")

    async def _append(self, table: str, keys: Sequence[Key], op: str) -> None:
        with wrap_errors(f"enqueue keys of {table!r}"):
            pipe = self._redis.pipeline(transaction=False)
            for key in keys:
                pipe.xadd(self._stream, encode_entry(table, key, op))
            await pipe.execute()

    # -- the feed -------------------------------------------------------------------------
    async def head(self) -> int:
        if self.capture == "poll":
            return await self._poll_head()
        with wrap_errors("read head"):
            if not await self._redis.exists(self._stream):
                return 0
            info = await self._redis.xinfo_stream(self._stream)
        return stream_position(info["last-generated-id"])

    async def read_changes(self, after: int, limit: int) -> list[Change]:
        if self.capture == "poll":
            changes = await self._poll(after, limit)
        else:
            with wrap_errors("read outbox"):
                entries = await self._entries_after(after, limit)
            changes = [decode_entry(i, f) for i, f in entries]
        self._cursor = max(after, changes[-1].position if changes else after)
        return changes

    async def _entries_after(self, after: int, count: int) -> list[tuple[str, dict[str, str]]]:
        start = f"({_stream_id(max(after, self._floor))}"  # exclusive
        return list(await self._redis.xrange(self._stream, min=start, max="+", count=count))

    async def wait(self, timeout: float) -> None:
        if self.capture == "poll":
            await asyncio.sleep(timeout)
            return
        with wrap_errors("wait for the outbox"):
            await self._redis.xread(
                {self._stream: _stream_id(self._cursor)}, count=1, block=max(1, int(timeout * 1000))
            )

    async def ack(self, position: int) -> None:
        if self.capture == "poll":
            return
        with wrap_errors("release outbox"):
            await self._redis.hset(self._acked, self.name, position)
            acked = [int(v) for v in (await self._redis.hvals(self._acked))]
            kept = _stream_id(min(acked) + 1)  # entries every reader acknowledged go
            await self._redis.xtrim(self._stream, minid=kept, approximate=False)

    async def backlog(self, after: int) -> Backlog:
        if self.capture == "poll":
            return await self._poll_backlog(after)
        with wrap_errors("read backlog"):
            entries = await self._entries_after(after, _BACKLOG_CAP)
            count = len(entries)
            if count == _BACKLOG_CAP:
                count = int(await self._redis.xlen(self._stream))
        oldest = decode_entry(*entries[0]).committed_at if entries else None
        return Backlog(changes=count, oldest_committed_at=oldest)
