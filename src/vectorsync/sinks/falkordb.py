"""FalkorDB sink: each point a node of one graph, labelled by its collection.

The Cypher core (:mod:`._graph_sink`) holds what graph sinks share; this module connects
(through the FalkorDB source's :func:`~vectorsync.sources.falkordb.connect`) and speaks
FalkorDB's dialect: vectors are ``vecf32`` values under ``CREATE VECTOR INDEX ... OPTIONS
{dimension, similarityFunction}`` (``cosine`` or ``euclidean``: FalkorDB 4.16 has no inner
product, so ``dot`` collections are refused) and searched with
``db.idx.vector.queryNodes``, whose score is the cosine distance (``1 - similarity``) or
the Euclidean distance. A filtered search asks the index for ten candidates per hit
wanted (at least 100), then eight times as many, and when the filters still leave fewer
than the limit, reads every matching node (exact; the payload indexes serve it). Every
returned write is applied: FalkorDB runs one query at a time, each one whole."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import orjson

from ..errors import PermanentError, SinkError
from ..redact import redact
from ..sources.cypher import ident
from ..sources.falkordb import connect, disconnect, wrap_errors
from ._graph_sink import GraphSink
from ._graph_values import VECTOR
from .base import Distance

__all__ = ["FalkorDBSink"]

logger = logging.getLogger(__name__)

_SIMILARITY: dict[Distance, str] = {"cosine": "cosine", "euclid": "euclidean"}


class FalkorDBSink(GraphSink):
    store = "FalkorDB"

    def __init__(
        self, name: str, url: str, *, graph: str = "vectorsync", timeout: float = 60.0
    ) -> None:
        self.name = name
        self.url = url
        self.graph_name = graph
        self.timeout = timeout
        self._db: Any = None
        self._graph: Any = None

    def __repr__(self) -> str:
        return f"FalkorDBSink({self.name!r}, {redact(self.url)!r}, graph={self.graph_name!r})"

    def _where(self) -> str:
        return f"graph {self.graph_name!r}"

    def _errors(self, what: str) -> contextlib.AbstractContextManager[None]:
        return wrap_errors(what, f"sink {self.name!r}", SinkError)

    # -- lifecycle ------------------------------------------------------------------------
    async def open(self) -> None:
        if self._db is None:
            self._db = await connect(
                self.url, f"sink {self.name!r}", SinkError, timeout=self.timeout
            )
            self._graph = self._db.select_graph(self.graph_name)

    async def close(self) -> None:
        if self._db is not None:
            db, self._db, self._graph = self._db, None, None
            await disconnect(db)

    async def problems(self) -> list[str]:
        try:
            await self.open()
            with self._errors("ping"):
                await self._db.connection.ping()
        except SinkError as exc:
            return [f"{redact(str(exc))}; start the FalkorDB server or fix sinks.{self.name}.url"]
        return []

    # -- queries --------------------------------------------------------------------------
    async def run(
        self, what: str, query: str, params: dict[str, Any] | None = None, *, write: bool = True
    ) -> list[list[Any]]:
        if self._graph is None:
            await self.open()
        with self._errors(what):
            if write:
                result = await self._graph.query(query, params)
            elif not await self._exists():
                return []  # nothing written yet: reading would fail on the missing key
            else:
                result = await self._graph.ro_query(query, params)
        return list(result.result_set)

    async def _exists(self) -> bool:
        return bool(await self._db.connection.exists(self.graph_name))

    async def ddl(self, what: str, query: str) -> None:
        try:
            await self.run(what, query)
        except PermanentError as exc:
            text = str(exc)
            if "already indexed" not in text and "no such index" not in text:
                raise

    # -- the dialect ----------------------------------------------------------------------
    def vector(self, expr: str) -> str:
        return f"vecf32({expr})"

    def vector_param(self, vector: list[float]) -> Any:
        return _Numbers(vector)

    def vector_index(self, label: str, dimension: int, distance: Distance) -> str:
        return (
            f"CREATE VECTOR INDEX FOR (n:{ident(label)}) ON (n.{VECTOR}) "
            f"OPTIONS {{dimension: {int(dimension)}, "
            f"similarityFunction: '{_SIMILARITY[distance]}'}}"
        )

    def drop_vector_index(self, label: str) -> str:
        return f"DROP VECTOR INDEX FOR (n:{ident(label)}) ON (n.{VECTOR})"

    def range_index(self, label: str, prop: str) -> str:
        return f"CREATE INDEX FOR (n:{ident(label)}) ON (n.{ident(prop)})"

    def drop_range_index(self, label: str, prop: str) -> str:
        return f"DROP INDEX FOR (n:{ident(label)}) ON (n.{ident(prop)})"

    def nearest(self, label: str) -> str:
        # the label is a value here, not an identifier: it travels as $label
        return f"db.idx.vector.queryNodes($label, '{VECTOR}', $k, vecf32($q))"

    def distance_to(self, distance: Distance, expr: str) -> str:
        fn = "vec.cosineDistance" if distance == "cosine" else "vec.euclideanDistance"
        return f"{fn}({expr}, vecf32($q))"

    def score(self, distance: Distance, raw: float) -> float:
        return 1.0 - raw if distance == "cosine" else raw


class _Numbers:
    """A list of numbers as a query parameter, rendered in one call: the falkordb client
    renders a parameter it does not know with ``str()``, and renders a list item by item
    in Python (most of an upsert's time for 384-d vectors). JSON numbers are Cypher's."""

    __slots__ = ("_text",)

    def __init__(self, numbers: list[float]) -> None:
        self._text = orjson.dumps(
            numbers, default=float, option=orjson.OPT_SERIALIZE_NUMPY
        ).decode()

    def __str__(self) -> str:
        return self._text
