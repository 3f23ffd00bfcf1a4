"""Neo4j sink over Bolt with the official driver: the FalkorDB sink's Cypher core.

Nodes, properties, the catalog and aliases are the FalkorDB sink's (:mod:`._graph_sink`);
this module speaks Neo4j 5's dialect: vectors are plain float lists under a named vector
index (``CREATE VECTOR INDEX ... OPTIONS {indexConfig: {`vector.dimensions`,
`vector.similarity_function`}}``, cosine or euclidean: no dot product, so ``dot``
collections are refused), searched with ``db.index.vector.queryNodes``, whose score is
Neo4j's normalised similarity — ``(1 + cos) / 2`` and ``1 / (1 + d²)`` — turned back into
Qdrant's cosine similarity and Euclidean distance. No Neo4j server can run on the machine
this was built on: its tests run only when ``NEO4J_URI`` points at one.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

from ..errors import PermanentError, SinkError
from ..redact import redact
from ..sources.cypher import ident
from ..sources.neo4j import wrap_errors
from ._graph_edges import EdgeSpec
from ._graph_sink import GraphSink
from ._graph_values import VECTOR
from .base import Distance

__all__ = ["Neo4jSink"]

_SIMILARITY: dict[Distance, str] = {"cosine": "cosine", "euclid": "euclidean"}
_EXISTS = ("EquivalentSchemaRuleAlreadyExists", "IndexAlreadyExists")


class Neo4jSink(GraphSink):
    store = "Neo4j"
    is_list = "valueType({}) STARTS WITH 'LIST'"
    nearest_first = "DESC"  # Neo4j scores similarity: higher is nearer

    def __init__(
        self,
        name: str,
        url: str,
        *,
        user: str = "neo4j",
        password: str | None = None,
        database: str | None = None,
        edges: Sequence[EdgeSpec] = (),
    ) -> None:
        self.name = name
        self.edges = tuple(edges)
        self.url = url
        self._auth = (user, password or "")
        self._database = database
        self._driver: Any = None

    def __repr__(self) -> str:
        return f"Neo4jSink({self.name!r}, {redact(self.url)!r})"

    def _where(self) -> str:
        return f"Neo4j database {self._database or '(default)'!r}"

    def _errors(self, what: str) -> contextlib.AbstractContextManager[None]:
        return wrap_errors(what, f"sink {self.name!r}", SinkError)

    async def open(self) -> None:
        if self._driver is not None:
            return
        from neo4j import AsyncGraphDatabase

        driver = AsyncGraphDatabase.driver(self.url, auth=self._auth)
        try:
            with self._errors(f"connect to {redact(self.url)}"):
                await driver.verify_connectivity()
        except BaseException:
            await driver.close()
            raise
        self._driver = driver

    async def close(self) -> None:
        if self._driver is not None:
            driver, self._driver = self._driver, None
            await driver.close()

    async def problems(self) -> list[str]:
        try:
            await self.open()
            with self._errors(f"reach {redact(self.url)}"):
                await self._driver.verify_connectivity()
        except SinkError as exc:
            return [f"{redact(str(exc))}; start Neo4j or fix sinks.{self.name}.url"]
        return []

    async def run(
        self, what: str, query: str, params: dict[str, Any] | None = None, *, write: bool = True
    ) -> list[list[Any]]:
        await self.open()
        with self._errors(what):
            records, _, _ = await self._driver.execute_query(
                query, params or {}, database_=self._database, routing_="w" if write else "r"
            )
        return [list(r.values()) for r in records]

    async def ddl(self, what: str, query: str) -> None:
        try:
            await self.run(what, query)
        except PermanentError as exc:
            if not any(code in str(exc.code) for code in _EXISTS):
                raise

    # -- the dialect ----------------------------------------------------------------------
    def vector(self, expr: str) -> str:
        return expr

    def vector_index(self, label: str, dimension: int, distance: Distance) -> str:
        return (
            f"CREATE VECTOR INDEX {ident(self.index_name(label, VECTOR))} IF NOT EXISTS "
            f"FOR (n:{ident(label)}) ON (n.{VECTOR}) OPTIONS {{indexConfig: "
            f"{{`vector.dimensions`: {int(dimension)}, "
            f"`vector.similarity_function`: '{_SIMILARITY[distance]}'}}}}"
        )

    def drop_vector_index(self, label: str) -> str:
        return f"DROP INDEX {ident(self.index_name(label, VECTOR))} IF EXISTS"

    def range_index(self, label: str, prop: str) -> str:
        return (
            f"CREATE INDEX {ident(self.index_name(label, prop))} IF NOT EXISTS "
            f"FOR (n:{ident(label)}) ON (n.{ident(prop)})"
        )

    def drop_range_index(self, label: str, prop: str) -> str:
        return f"DROP INDEX {ident(self.index_name(label, prop))} IF EXISTS"

    def nearest(self, label: str) -> str:
        return "db.index.vector.queryNodes($index, $k, $q)"

    def distance_to(self, distance: Distance, expr: str) -> str:
        return f"vector.similarity.{_SIMILARITY[distance]}({expr}, $q)"

    def score(self, distance: Distance, raw: float) -> float:
        if distance == "cosine":
            return 2.0 * raw - 1.0
        return math.sqrt(max(1.0 / raw - 1.0, 0.0)) if raw > 0 else math.inf
