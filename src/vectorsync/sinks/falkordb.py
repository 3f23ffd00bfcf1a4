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

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import orjson

from ..errors import PermanentError, SinkError
from ..redact import redact
from ..sources.cypher import ident
from ..sources.falkordb import connect, disconnect, wrap_errors
from ._graph_edges import EdgeSpec
from ._graph_sink import GraphSink
from ._graph_values import VECTOR
from .base import Distance

__all__ = ["FalkorDBSink"]

logger = logging.getLogger(__name__)

_SIMILARITY: dict[Distance, str] = {"cosine": "cosine", "euclid": "euclidean"}
_PROBE = 50  # nodes a maintenance probe asks the vector index for


class FalkorDBSink(GraphSink):
    store = "FalkorDB"

    def __init__(
        self,
        name: str,
        url: str,
        *,
        graph: str = "vectorsync",
        timeout: float = 60.0,
        edges: Sequence[EdgeSpec] = (),
    ) -> None:
        self.name = name
        self.edges = tuple(edges)
        self.url = url
        self.graph_name = graph
        self.timeout = timeout
        self._db: Any = None
        self._graph: Any = None
        self._graph_exists = False

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
            self._graph_exists = False
            return [f"{redact(str(exc))}; start the FalkorDB server or fix sinks.{self.name}.url"]
        return []

    # -- queries --------------------------------------------------------------------------
    async def run(
        self, what: str, query: str, params: dict[str, Any] | None = None, *, write: bool = True
    ) -> list[list[Any]]:
        if self._graph is None:
            await self.open()
        try:
            with self._errors(what):
                if write:
                    result = await self._graph.query(query, params)
                elif not await self._exists():
                    return []  # nothing written yet: reading would fail on the missing key
                else:
                    result = await self._graph.ro_query(query, params)
        except SinkError:
            self._graph_exists = False  # a server that comes back may come back empty
            raise
        return list(result.result_set)

    async def _exists(self) -> bool:
        if not self._graph_exists:  # once there, a graph stays (vectorsync never drops it)
            self._graph_exists = bool(await self._db.connection.exists(self.graph_name))
        return self._graph_exists

    async def ddl(self, what: str, query: str) -> None:
        try:
            await self.run(what, query)
        except PermanentError as exc:
            text = str(exc)
            if "already indexed" not in text and "no such index" not in text:
                raise

    # -- housekeeping -------------------------------------------------------------------
    async def maintain(self, collection: str) -> list[str]:
        """Rebuild the vector index when rewritten nodes' stale entries make it yield fewer
        nodes than asked (FalkorDB keeps them until the index is built again). Searches
        read every node while it builds."""
        entry = await self._resolve(collection)
        asked = min(await self._count(entry), _PROBE)
        if asked == 0:
            return []
        label = ident(entry.name)
        got = await self.run(
            f"probe the vector index of {collection!r}",
            f"MATCH (p:{label}) WITH p LIMIT 1 "
            f"CALL db.idx.vector.queryNodes($label, '{VECTOR}', $k, p.{VECTOR}) YIELD node "
            "RETURN count(node)",
            {"label": entry.name, "k": asked},
            write=False,
        )
        yielded = int(got[0][0]) if got else 0
        if yielded >= asked:
            return []
        await self.run(
            f"rebuild the vector index of {collection!r}", self.drop_vector_index(entry.name)
        )
        await self.run(
            f"rebuild the vector index of {collection!r}",
            self.vector_index(entry.name, entry.dimension, entry.distance),
        )
        state = await self._built(entry.name)
        return [
            f"rebuilt the vector index of {entry.name!r} (it yielded {yielded} of {asked} "
            f"nodes asked: entries of rewritten nodes){'' if state else '; still building'}"
        ]

    async def _built(self, label: str) -> bool:
        """Wait (up to ten replies' timeouts) for the label's indexes to be operational."""
        end = asyncio.get_running_loop().time() + self.timeout * 10
        while True:
            rows = await self.run(
                "read the index states",
                "CALL db.indexes() YIELD label, status WHERE label = $label RETURN status",
                {"label": label},
                write=False,
            )
            if all(r[0] == "OPERATIONAL" for r in rows):
                return True
            if asyncio.get_running_loop().time() > end:
                return False
            await asyncio.sleep(0.2)

    async def collection_size(self, collection: str) -> int | None:
        """The memory the label's nodes take (FalkorDB keeps the graph in memory), in
        whole MiB as ``GRAPH.MEMORY USAGE`` reports it."""
        entry = await self._resolve(collection)
        await self.open()
        with self._errors(f"size of {collection!r}"):
            usage = await self._db.connection.execute_command(
                "GRAPH.MEMORY", "USAGE", self.graph_name
            )
        by_label = dict(usage).get("amortized_node_attributes_by_label_sz_mb") or {}
        mib = by_label.get(entry.name)
        return None if mib is None else int(mib) * 2**20

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
