"""The sink port: idempotent writes keyed by deterministic point ids."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import orjson

from ..model import Condition, PayloadUpdate, Point, SinkRecord, SparseVector

__all__ = [
    "HYBRID_CANDIDATES",
    "CollectionSpec",
    "Distance",
    "Hit",
    "IndexType",
    "Maintained",
    "NamedSearch",
    "PayloadScan",
    "Sink",
    "Sized",
    "VectorSpec",
    "extra_vectors",
    "index_type_for",
    "join_vectors",
    "named_vectors",
    "split_vector",
]

Distance = Literal["cosine", "dot", "euclid"]
IndexType = Literal["keyword", "integer", "float", "bool", "datetime", "text"]


@dataclass(frozen=True, slots=True, kw_only=True)
class VectorSpec:
    """One named vector of a collection's points."""

    name: str
    dimension: int
    distance: Distance
    sparse: bool = False  # a sparse vector (embed.sparse): the sink weighs terms by IDF
    # outside the concatenation: written where a point carries it (Point.extra), e.g. the
    # foreign vector conflicts' keep_both keeps; points without one have none
    extra: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectionSpec:
    name: str
    dimension: int
    distance: Distance
    indexes: Mapping[str, IndexType] = field(default_factory=dict)
    # named vectors (embed.named): a point's vector is their concatenation, in this order;
    # empty: one unnamed vector
    vectors: tuple[VectorSpec, ...] = ()


def named_vectors(
    layout: Sequence[VectorSpec], point: Point, sparse: Callable[[SparseVector], Any]
) -> dict[str, Any]:
    """A point's vectors by name, sparse ones as ``sparse`` makes them (the client's type)."""
    named = split_vector(layout, point.vector)
    named.update((n, sparse(v)) for n, v in point.sparse.items())
    named.update((n, list(v)) for n, v in point.extra.items())
    return named


def split_vector(layout: Sequence[VectorSpec], vector: Sequence[float]) -> dict[str, Any]:
    """A concatenation of named vectors (embed.named) as the dense vectors by name."""
    out: dict[str, Any] = {}
    at = 0
    for v in layout:
        if v.sparse or v.extra:
            continue  # not part of the concatenation: Point.sparse / Point.extra hold it
        out[v.name] = list(vector[at : at + v.dimension])
        at += v.dimension
    return out


def join_vectors(layout: Sequence[VectorSpec], named: Mapping[str, Sequence[float]]) -> list[float]:
    """Named vectors as read from a sink, concatenated in the layout's order."""
    return [x for v in layout if not (v.sparse or v.extra) for x in named.get(v.name, ())]


def extra_vectors(layout: Sequence[VectorSpec], named: Mapping[str, Any]) -> dict[str, list[float]]:
    """The vectors outside the concatenation (``VectorSpec.extra``) a point read holds."""
    return {v.name: list(named[v.name]) for v in layout if v.extra and named.get(v.name)}


@dataclass(frozen=True, slots=True)
class Hit:
    score: float
    record: SinkRecord


def same_updates(
    updates: Sequence[PayloadUpdate],
) -> list[tuple[list[str], dict[str, Any], tuple[str, ...]]]:
    """Payload updates that set the same values and drop the same fields, as one
    ``(ids, set, unset)`` group each, in first-seen order: a bulk change of one column
    (a status flipped on many rows) becomes one sink call instead of one per point."""
    groups: dict[bytes, tuple[list[str], dict[str, Any], tuple[str, ...]]] = {}
    for u in updates:
        unset = tuple(sorted(u.unset))
        same = orjson.dumps([u.set, unset], option=orjson.OPT_SORT_KEYS, default=repr)
        group = groups.get(same)
        if group is None:
            groups[same] = ([u.id], u.set, unset)
        else:
            group[0].append(u.id)
    return list(groups.values())


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

    # Index versions: each version is a physical collection (``articles__v2``); readers use
    # an alias (``articles``) naming the live one. Every method above also accepts an alias
    # and acts on the collection it names, as a Qdrant server does.

    async def set_alias(self, alias: str, collection: str) -> None:
        """Make ``alias`` name the physical ``collection``, replacing what it named before,
        in one step readers cannot observe half-done. PermanentError if ``collection`` is
        missing or is itself an alias, or if a real collection is named ``alias`` (one made
        before versions existed: move it aside with ``rename_collection`` first)."""
        ...

    async def alias_target(self, alias: str) -> str | None:
        """The collection ``alias`` names; None if it is no alias (or a real collection)."""
        ...

    async def is_alias(self, name: str) -> bool: ...

    async def rename_collection(self, old: str, new: str) -> None:
        """Give a physical collection another name, keeping its points. PermanentError where
        the store cannot (Qdrant through qdrant-client), if ``new`` is taken, or if an alias
        names ``old``."""
        ...

    async def drop_collection(self, name: str) -> None:
        """Delete a physical collection and its points; nothing if it is missing.
        PermanentError if ``name`` is an alias or an alias names it (it is live)."""
        ...

    async def collections(self) -> list[str]:
        """The physical collections, sorted (aliases are not listed)."""
        ...


# Optional faces of a sink: the engine uses them where a sink has them.


@runtime_checkable
class NamedSearch(Protocol):
    """A sink that stores named vectors (a collection with ``CollectionSpec.vectors``)."""

    async def search_vector(
        self,
        collection: str,
        name: str,
        vector: Sequence[float] | SparseVector,
        limit: int = 5,
        where: Sequence[Condition] = (),
    ) -> list[Hit]:
        """``search`` by the named vector ``name`` (dense or sparse)."""
        ...

    async def search_hybrid(
        self,
        collection: str,
        dense: tuple[str, Sequence[float]],
        sparse: tuple[str, SparseVector],
        limit: int = 5,
        where: Sequence[Condition] = (),
    ) -> list[Hit]:
        """The ``limit`` best points of a dense and a sparse search (each by its named
        vector, each over a few times ``limit`` candidates), fused by reciprocal rank."""
        ...


HYBRID_CANDIDATES = 4  # times limit: what each side of a hybrid search hands the fusion


@runtime_checkable
class Maintained(Protocol):
    """A sink with housekeeping of its own (``vectorsync maintain``)."""

    async def maintain(self, collection: str) -> list[str]:
        """Do the store's housekeeping on a (physical) collection; what was done, one line
        each, naming the operation ([] when nothing needed doing)."""
        ...


@runtime_checkable
class PayloadScan(Protocol):
    """A sink that reads every point's bookkeeping cheaper than ``scroll``: plain
    ``(id, payload)`` pairs a page at a time, no vectors (what a full check reads)."""

    def scroll_payloads(
        self, collection: str, fields: Sequence[str], *, page: int = 5000
    ) -> AsyncIterator[list[tuple[str, Mapping[str, Any]]]]:
        """Every point of a collection, a page at a time: its id and a payload holding at
        least the fields named that the point has (possibly more)."""
        ...


@runtime_checkable
class Sized(Protocol):
    """A sink that can tell how much room a collection takes (``/metrics``)."""

    async def collection_size(self, collection: str) -> int | None:
        """Bytes the collection takes in the store (on disk; in memory for an in-memory
        store such as FalkorDB), or None where the store cannot say."""
        ...
