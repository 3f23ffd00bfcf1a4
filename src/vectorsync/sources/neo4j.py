"""Neo4j source over Bolt with the official driver: the same Cypher as FalkorDB.

Neo4j has no change feed in its community edition and vectorsync's outbox lives in Redis
beside FalkorDB, so a Neo4j source reads changes by polling: every writer sets
``version_property = timestamp()`` on the nodes it changes (deleted nodes and edge-only
changes are found by ``vectorsync check --repair``). No Neo4j server can be installed on
the machine this was built on: its tests run only when ``NEO4J_URI`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from ..errors import ConfigError, PermanentError, RetryableError, SourceError
from ..model import Change, Key
from ..redact import redact
from .base import Backlog, TableSpec
from .cypher import GraphSource

__all__ = ["Neo4jSource", "wrap_errors"]


@contextlib.contextmanager
def wrap_errors(
    what: str, who: str = "neo4j source", retryable: type[RetryableError] = SourceError
) -> Iterator[None]:
    from neo4j import exceptions as nex

    try:
        yield
    except (nex.ServiceUnavailable, nex.SessionExpired, OSError) as exc:
        raise retryable(f"{who}: {what}: {exc}", code="ECONNREFUSED") from exc
    except nex.Neo4jError as exc:
        raise PermanentError(f"{who}: {what}: {exc}", code=exc.code) from exc
    except nex.DriverError as exc:
        raise retryable(f"{who}: {what}: {exc}") from exc


class Neo4jSource(GraphSource):
    def __init__(
        self,
        name: str,
        url: str,
        *,
        user: str = "neo4j",
        password: str | None = None,
        database: str | None = None,
        capture: Literal["outbox", "poll"] = "poll",
        version_property: str = "updated_at",
        poll_grace: float = 1.0,
    ) -> None:
        if capture != "poll":
            raise ConfigError(
                f'source {name!r}: Neo4j is read by polling; set capture = "poll" and have '
                "writers set version_property = timestamp() on every node they change"
            )
        self.name = name
        self.url = url
        self.graph_name = database or "neo4j"
        self.version_property = version_property
        self.poll_grace = poll_grace
        self._auth = (user, password or "")
        self._database = database
        self._driver: Any = None
        self._tables: dict[str, str] = {}

    async def open(self) -> None:
        from neo4j import AsyncGraphDatabase

        self._driver = AsyncGraphDatabase.driver(self.url, auth=self._auth)
        with wrap_errors(f"connect to {redact(self.url)}"):
            await self._driver.verify_connectivity()
        rows = await self.query(
            "read capture registry",
            "MATCH (r:VectorsyncCapture {source: $source}) RETURN r.label, r.key",
            {"source": self.name},
        )
        self._tables = {label: key for label, key in rows}

    async def close(self) -> None:
        if self._driver is not None:
            await self._driver.close()
            self._driver = None

    async def query(
        self, what: str, query: str, params: dict[str, Any] | None = None
    ) -> list[list[Any]]:
        with wrap_errors(what):
            records, _, _ = await self._driver.execute_query(
                query, params or {}, database_=self._database, routing_="r"
            )
        return [list(r.values()) for r in records]

    async def write(self, what: str, query: str, params: dict[str, Any] | None = None) -> None:
        with wrap_errors(what):
            await self._driver.execute_query(query, params or {}, database_=self._database)

    async def setup(self, tables: Sequence[TableSpec]) -> list[str]:
        new = [s for s in tables if self._tables.get(s.table) != s.key]
        for spec in new:
            await self.write(
                "register capture",
                "MERGE (r:VectorsyncCapture {source: $source, label: $label}) SET r.key = $key",
                {"source": self.name, "label": spec.table, "key": spec.key},
            )
            self._tables[spec.table] = spec.key
            await self.resnapshot(spec)
        return [s.table for s in new]

    async def teardown(self) -> None:
        await self.write(
            "remove capture",
            "MATCH (r:VectorsyncCapture {source: $source}) DELETE r",
            {"source": self.name},
        )
        self._tables = {}

    async def resnapshot(self, spec: TableSpec) -> None:
        await self._touch(spec.table, None)

    async def enqueue(self, table: str, keys: Sequence[Key]) -> None:
        await self._touch(table, list(keys))

    async def head(self) -> int:
        return await self._poll_head()

    async def read_changes(self, after: int, limit: int) -> list[Change]:
        return await self._poll(after, limit)

    async def wait(self, timeout: float) -> None:
        await asyncio.sleep(timeout)

    async def ack(self, position: int) -> None:
        return None

    async def backlog(self, after: int) -> Backlog:
        return await self._poll_backlog(after)
