"""Cypher for graph sources (FalkorDB, Neo4j): one generator, so both read the same way.

Labels, property names and keys from the config are backtick-quoted; values always travel
as query parameters. Related-field expressions and patterns are the user's Cypher (like a
text template) and are inserted as written.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

from ..errors import ConfigError
from ..model import Change, Key
from ..related import RelatedRecord, Relation
from .base import Backlog, TableSpec

__all__ = [
    "GraphSource",
    "column_types",
    "dependents_query",
    "fetch_query",
    "ident",
    "plain",
    "poll_query",
    "related_query",
    "sample_query",
    "scan_query",
]

SAMPLE = 1000  # nodes read to learn a label's properties and their types
PAGE = 1000


def ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def fetch_query(label: str, key: str) -> str:
    k = ident(key)
    return f"MATCH (n:{ident(label)}) WHERE n.{k} IN $keys RETURN n.{k}, properties(n)"


def scan_query(label: str, key: str, *, first: bool) -> str:
    """A page of nodes in key order (a node without its key property cannot be a record)."""
    k = ident(key)
    where = f"n.{k} IS NOT NULL" if first else f"n.{k} > $after"
    return (
        f"MATCH (n:{ident(label)}) WHERE {where} "
        f"RETURN n.{k} AS k, properties(n) ORDER BY k LIMIT $page"
    )


def sample_query(label: str) -> str:
    return f"MATCH (n:{ident(label)}) WITH n LIMIT {SAMPLE} RETURN properties(n)"


def related_query(owner_label: str, owner_key: str, rel: Relation) -> str:
    """One row per (owner key, related key, field values...) pair."""
    o, r = rel.owner_var, rel.related_var
    fields = "".join(f", {expr}" for _, expr in rel.fields)
    return (
        f"MATCH ({o}:{ident(owner_label)}) WHERE {o}.{ident(owner_key)} IN $keys "
        f"MATCH {rel.pattern} "
        f"RETURN DISTINCT {o}.{ident(owner_key)}, {r}.{ident(rel.key)}{fields}"
    )


def dependents_query(owner_label: str, owner_key: str, rel: Relation) -> str:
    o, r = rel.owner_var, rel.related_var
    return (
        f"MATCH {rel.pattern} WHERE {r}.{ident(rel.key)} IN $keys AND {o}:{ident(owner_label)} "
        f"RETURN DISTINCT {o}.{ident(owner_key)}"
    )


def poll_query(label: str, key: str, version: str) -> str:
    """Nodes whose version property is in (after, upto], oldest first."""
    v = ident(version)
    return (
        f"MATCH (n:{ident(label)}) WHERE n.{v} > $after AND n.{v} <= $upto "
        f"RETURN n.{ident(key)}, n.{v} ORDER BY n.{v} LIMIT $limit"
    )


def plain(value: Any) -> Any:
    """A property value as a JSON-friendly Python value."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    return str(value)


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "BOOLEAN"
    if isinstance(value, int):
        return "INTEGER"
    if isinstance(value, float):
        return "FLOAT"
    if isinstance(value, str):
        return "TEXT"
    if isinstance(value, list):
        inner = {_type_name(v) for v in value}
        return f"LIST<{inner.pop()}>" if len(inner) == 1 else "LIST"
    return "MAP" if isinstance(value, Mapping) else ""


def column_types(samples: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Property → type seen on sampled nodes; "" where values of several types were seen
    (no payload index is made for those)."""
    seen: dict[str, set[str]] = {}
    for props in samples:
        for name, value in props.items():
            if value is not None:
                seen.setdefault(name, set()).add(_type_name(value))
    return {name: types.pop() if len(types) == 1 else "" for name, types in seen.items()}


class GraphSource:
    """What every Cypher source shares: reads, related fields, polling. Subclasses run
    queries (``query`` for reads, ``write`` for writes) and may add an outbox feed."""

    name: str
    graph_name: str
    version_property: str
    poll_grace: float
    _tables: dict[str, str]  # captured label → key property

    async def query(
        self, what: str, query: str, params: dict[str, Any] | None = None
    ) -> list[list[Any]]:
        raise NotImplementedError

    async def write(self, what: str, query: str, params: dict[str, Any] | None = None) -> None:
        raise NotImplementedError

    async def labels(self) -> list[str]:
        return [r[0] for r in await self.query("list labels", "CALL db.labels()")]

    async def check_key(self, spec: TableSpec) -> None:
        return None  # graphs have no declared keys: a node without the property is skipped

    async def epoch(self) -> str:
        """Graph positions are stream ids or server timestamps: they never restart, so one
        epoch serves every installation ("" while nothing is captured)."""
        return "graph" if self._tables else ""

    async def columns(self, table: str) -> dict[str, str]:
        labels = await self.labels()
        if labels and table not in labels:
            raise ConfigError(
                f"source {self.name!r}: label {table!r} not found in graph "
                f"{self.graph_name!r} (labels: {', '.join(sorted(labels))})"
            )
        rows = await self.query(f"sample {table!r}", sample_query(table))
        return column_types(r[0] for r in rows)

    async def _key_pages(self, spec: TableSpec) -> AsyncIterator[list[Key]]:
        page: list[Key] = []
        async for row in self.scan(spec.table, spec.key, page=PAGE):
            page.append(row[spec.key])
            if len(page) == PAGE:
                yield page
                page = []
        if page:
            yield page

    async def _touch(self, table: str, keys: list[Key] | None) -> None:
        """Poll mode: mark nodes changed by setting their version to the server's clock."""
        key = self._tables.get(table, "id")
        where = "" if keys is None else f"WHERE n.{ident(key)} IN $keys "
        query = (
            f"MATCH (n:{ident(table)}) {where}SET n.{ident(self.version_property)} = timestamp()"
        )
        await self.write(f"mark {table!r} changed", query, {"keys": keys})

    # -- polling --------------------------------------------------------------------------
    def _upto(self) -> int:
        return int((time.time() - self.poll_grace) * 1000)

    async def _poll(self, after: int, limit: int) -> list[Change]:
        found = await self._versions(after, self._upto(), limit + 1)
        if len(found) > limit:
            # never stop inside one version: the next poll starts after it
            last = found[limit - 1][0]
            found = [f for f in found if f[0] < last] or await self._versions(
                last - 1,
                last,
                2**31 - 1,  # one version holds more nodes than a batch
            )
        return [
            Change(table=t, key=k, op="update", position=v, committed_at=v / 1000.0)
            for v, t, k in found
        ]

    async def _versions(self, after: int, upto: int, limit: int) -> list[tuple[int, str, Key]]:
        """(version, label, key) of nodes with a version in (after, upto], oldest first."""
        found: list[tuple[int, str, Key]] = []
        for label, key in self._tables.items():
            query = poll_query(label, key, self.version_property)
            rows = await self.query(
                f"poll {label!r}", query, {"after": after, "upto": upto, "limit": limit}
            )
            found.extend(
                (int(v), label, k) for k, v in rows if isinstance(v, int) and k is not None
            )
        found.sort(key=lambda f: f[0])
        return found

    async def _poll_head(self) -> int:
        newest = 0
        for label in self._tables:
            v = ident(self.version_property)
            rows = await self.query(
                f"read head of {label!r}",
                f"MATCH (n:{ident(label)}) WHERE n.{v} <= $upto RETURN max(n.{v})",
                {"upto": self._upto()},
            )
            if rows and isinstance(rows[0][0], int):
                newest = max(newest, rows[0][0])
        return newest

    async def _poll_backlog(self, after: int) -> Backlog:
        count, oldest = 0, None
        v = ident(self.version_property)
        for label in self._tables:
            rows = await self.query(
                f"read backlog of {label!r}",
                f"MATCH (n:{ident(label)}) WHERE n.{v} > $after RETURN count(n), min(n.{v})",
                {"after": after},
            )
            if rows and rows[0][0]:
                count += int(rows[0][0])
                first = rows[0][1] / 1000.0
                oldest = first if oldest is None else min(oldest, first)
        return Backlog(changes=count, oldest_committed_at=oldest)

    # -- reads ----------------------------------------------------------------------------
    async def fetch(self, table: str, key: str, keys: Sequence[Key]) -> dict[Key, dict[str, Any]]:
        found: dict[Key, dict[str, Any]] = {}
        query = fetch_query(table, key)
        for i in range(0, len(keys), PAGE):
            rows = await self.query(f"re-read {table!r}", query, {"keys": list(keys[i : i + PAGE])})
            for k, props in rows:
                found[k] = {name: plain(v) for name, v in props.items()}
        return found

    async def scan(
        self, table: str, key: str, *, page: int = 5000, after: Key | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        while True:
            query = scan_query(table, key, first=after is None)
            rows = await self.query(f"scan {table!r}", query, {"after": after, "page": page})
            for _, props in rows:
                yield {name: plain(v) for name, v in props.items()}
            if len(rows) < page:
                return
            after = rows[-1][0]

    async def related(
        self, owner: TableSpec, rel: Relation, keys: Sequence[Key]
    ) -> dict[Key, list[RelatedRecord]]:
        query = related_query(owner.table, owner.key, rel)
        found: dict[Key, list[RelatedRecord]] = {}
        for i in range(0, len(keys), PAGE):
            rows = await self.query(
                f"read {rel.name!r} of {owner.table!r}", query, {"keys": list(keys[i : i + PAGE])}
            )
            for owner_key, related_key, *values in rows:
                fields = {o: plain(v) for o, v in zip(rel.outputs, values, strict=True)}
                found.setdefault(owner_key, []).append((related_key, fields))
        return found

    async def dependents(
        self, owner: TableSpec, rel: Relation, related_keys: Sequence[Key]
    ) -> list[Key]:
        query = dependents_query(owner.table, owner.key, rel)
        found: list[Key] = []
        for i in range(0, len(related_keys), PAGE):
            rows = await self.query(
                f"find records depending on {rel.table!r}",
                query,
                {"keys": list(related_keys[i : i + PAGE])},
            )
            found.extend(r[0] for r in rows)
        return found
