"""The sink port: idempotent writes keyed by deterministic point ids."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from ..model import Condition, PayloadUpdate, Point, SinkRecord

__all__ = ["CollectionSpec", "Distance", "Hit", "IndexType", "Sink", "index_type_for"]

Distance = Literal["cosine", "dot", "euclid"]
IndexType = Literal["keyword", "integer", "float", "bool", "datetime", "text"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectionSpec:
    name: str
    dimension: int
    distance: Distance
    indexes: Mapping[str, IndexType] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Hit:
    score: float
    record: SinkRecord


def index_type_for(declared: str) -> IndexType | None:
    """A payload index type from a source column's declared type (SQLite affinity rules)."""
    t = declared.upper()
    if "INT" in t:
        return "integer"
    if any(s in t for s in ("CHAR", "CLOB", "TEXT")):
        return "keyword"
    if any(s in t for s in ("REAL", "FLOA", "DOUB", "NUMERIC", "DECIMAL")):
        return "float"
    if "BOOL" in t:
        return "bool"
    if "DATE" in t or "TIME" in t:
        return "datetime"
    return None


class Sink(Protocol):
    """A vector store. Every write is acknowledged (durable) when the call returns."""

    name: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def problems(self) -> list[str]:
        """What keeps the sink from accepting writes right now (a full disk, an outage),
        each naming the fix; empty when healthy. Cheap enough for a readiness probe."""
        ...

    async def ensure_collection(self, spec: CollectionSpec) -> None:
        """Create the collection and its payload indexes if missing; PermanentError if an
        existing one has another dimension or distance."""
        ...

    async def upsert(self, collection: str, points: Sequence[Point]) -> None: ...

    async def update_payloads(self, collection: str, updates: Sequence[PayloadUpdate]) -> list[str]:
        """Set and remove payload fields of existing points, keeping their vectors.
        Returns the ids of points that do not exist (left alone: they need a full write)."""
        ...

    async def delete(self, collection: str, ids: Sequence[str]) -> None: ...

    async def retrieve(
        self, collection: str, ids: Sequence[str], *, with_vectors: bool = False
    ) -> list[SinkRecord]: ...

    def scroll(
        self,
        collection: str,
        *,
        with_vectors: bool = False,
        with_payload: bool = True,
        page: int = 1000,
    ) -> AsyncIterator[SinkRecord]: ...

    async def count(self, collection: str) -> int: ...

    async def search(
        self,
        collection: str,
        vector: Sequence[float],
        limit: int = 5,
        where: Sequence[Condition] = (),
    ) -> list[Hit]:
        """The ``limit`` nearest points whose payload meets every condition."""
        ...
