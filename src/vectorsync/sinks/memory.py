"""An in-memory sink with Qdrant's semantics (cosine vectors stored normalised)."""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import AsyncIterator, Sequence
from typing import Any

from ..errors import PermanentError, SinkError
from ..model import Condition, PayloadUpdate, Point, SinkRecord
from ._aliases import check_drop, check_rename, check_set_alias
from .base import CollectionSpec, Hit

__all__ = ["MemorySink"]


class MemorySink:
    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self.specs: dict[str, CollectionSpec] = {}
        self.points: dict[str, dict[str, tuple[list[float], dict[str, Any]]]] = {}
        self.aliases: dict[str, str] = {}  # alias -> physical collection
        self.down = False  # tests flip this to simulate an outage

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def problems(self) -> list[str]:
        return [f"sink {self.name!r} is down"] if self.down else []

    def points_in(self, collection: str) -> dict[str, tuple[list[float], dict[str, Any]]]:
        """A collection's points by id (vector, payload); an alias names the collection it
        points at (for tests that read the sink directly)."""
        return self.points[self.aliases.get(collection, collection)]

    def _check(self, collection: str) -> dict[str, tuple[list[float], dict[str, Any]]]:
        if self.down:
            raise SinkError(f"sink {self.name!r} is down")
        return self.points[self.aliases.get(collection, collection)]

    async def ensure_collection(self, spec: CollectionSpec) -> None:
        if spec.name in self.aliases:
            spec = dataclasses.replace(spec, name=self.aliases[spec.name])
        old = self.specs.get(spec.name)
        if old is not None and (old.dimension, old.distance) != (spec.dimension, spec.distance):
            raise PermanentError(
                f"collection {spec.name!r} has dimension {old.dimension}/{old.distance}, "
                f"not {spec.dimension}/{spec.distance}"
            )
        self.specs[spec.name] = spec
        self.points.setdefault(spec.name, {})

    async def upsert(self, collection: str, points: Sequence[Point]) -> None:
        store = self._check(collection)
        spec = self.specs[self.aliases.get(collection, collection)]
        dim, distance = spec.dimension, spec.distance
        for p in points:
            if len(p.vector) != dim:
                raise PermanentError(f"vector dimension {len(p.vector)}, expected {dim}")
            vec = _normalise(p.vector) if distance == "cosine" else list(p.vector)
            store[p.id] = (vec, dict(p.payload))

    async def update_payloads(self, collection: str, updates: Sequence[PayloadUpdate]) -> list[str]:
        store = self._check(collection)
        missing = [u.id for u in updates if u.id not in store]
        for u in updates:
            if u.id in store:
                vector, payload = store[u.id]
                merged = {k: v for k, v in payload.items() if k not in u.unset}
                store[u.id] = (vector, {**merged, **u.set})
        return missing

    async def delete(self, collection: str, ids: Sequence[str]) -> None:
        store = self._check(collection)
        for pid in ids:
            store.pop(pid, None)

    async def retrieve(
        self, collection: str, ids: Sequence[str], *, with_vectors: bool = False
    ) -> list[SinkRecord]:
        store = self._check(collection)
        return [_record(pid, store[pid], with_vectors) for pid in ids if pid in store]

    async def scroll(
        self,
        collection: str,
        *,
        with_vectors: bool = False,
        with_payload: bool = True,
        page: int = 1000,
    ) -> AsyncIterator[SinkRecord]:
        for pid, item in list(self._check(collection).items()):
            yield _record(pid, item, with_vectors)

    async def count(self, collection: str) -> int:
        return len(self._check(collection))

    async def search(
        self,
        collection: str,
        vector: Sequence[float],
        limit: int = 5,
        where: Sequence[Condition] = (),
    ) -> list[Hit]:
        q = _normalise(vector)
        scored = [
            Hit(sum(a * b for a, b in zip(q, vec, strict=True)), _record(pid, (vec, pl), False))
            for pid, (vec, pl) in self._check(collection).items()
            if all(_holds(c, pl.get(c.field)) for c in where)
        ]
        return sorted(scored, key=lambda h: -h.score)[:limit]

    async def set_alias(self, alias: str, collection: str) -> None:
        check_set_alias(self.name, alias, collection, set(self.points), self.aliases)
        self.aliases[alias] = collection

    async def alias_target(self, alias: str) -> str | None:
        return self.aliases.get(alias)

    async def is_alias(self, name: str) -> bool:
        return name in self.aliases

    async def rename_collection(self, old: str, new: str) -> None:
        check_rename(self.name, old, new, set(self.points), self.aliases)
        self.points[new] = self.points.pop(old)
        self.specs[new] = dataclasses.replace(self.specs.pop(old), name=new)

    async def drop_collection(self, name: str) -> None:
        check_drop(self.name, name, self.aliases)
        self.points.pop(name, None)
        self.specs.pop(name, None)

    async def collections(self) -> list[str]:
        return sorted(self.points)


def _holds(c: Condition, value: Any) -> bool:
    """A condition on one payload value, as Qdrant evaluates it (a list matches when one
    of its items does; a missing value matches nothing but ``ne``)."""
    if isinstance(value, list):
        return any(_holds(c, v) for v in value) if c.op != "ne" else c.value not in value
    if c.op == "eq":
        return bool(value == c.value)
    if c.op == "ne":
        return bool(value != c.value)
    if value is None or isinstance(value, bool) != isinstance(c.value, bool):
        return False
    try:
        return bool(_ORDER[c.op](value, c.value))
    except TypeError:  # a text against a number: no match, as in Qdrant
        return False


_ORDER = {"gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le}


def _record(pid: str, item: tuple[list[float], dict[str, Any]], with_vectors: bool) -> SinkRecord:
    return SinkRecord(id=pid, payload=dict(item[1]), vector=list(item[0]) if with_vectors else None)


def _normalise(v: Sequence[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / norm for x in v]
