"""The graph write API: change a FalkorDB graph and record the change for vectorsync in
the same transaction.

FalkorDB has no change feed. :class:`GraphWriter` runs each write as a Cypher query and
appends one outbox entry per node it touched to the Redis stream
``vectorsync:<graph>:outbox``, both inside one Redis MULTI/EXEC: Redis runs the
transaction alone and persists it whole, so a committed write always has its entry. (A
query that fails inside the transaction still leaves its entry: harmless, because the
sync re-reads current nodes; the error is raised after EXEC.)

    with GraphWriter("redis://127.0.0.1:6379", "kg") as kg:
        kg.upsert_node("Document", {"id": 7, "title": "Release notes"})
        kg.relate(("Document", 7), "HAS_CHUNK", ("DocumentChunk", 70))
        with kg.transaction():          # several writes, one MULTI/EXEC
            kg.delete_node("Entity", 3)
            kg.upsert_node("Entity", {"id": 4, "name": "Ada", "type": "person"})
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import PermanentError
from .model import Key
from .sources.cypher import ident
from .sources.falkordb import encode_entry, outbox_key, wrap_errors

__all__ = ["GraphWriteError", "GraphWriter", "NodeRef"]

NodeRef = tuple[str, Key]  # (label, key)
_Entry = tuple[str, Key, str, str | None]  # (label, key, op, relationship type)


class GraphWriteError(PermanentError):
    """FalkorDB refused a query of a write (nothing else of that query was applied)."""


@dataclass(slots=True)
class _Pending:
    queries: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    entries: list[_Entry] = field(default_factory=list)


class GraphWriter:
    """Writes to one FalkorDB graph with outbox entries for vectorsync.

    ``keys`` names each label's key property (default ``id``). With ``version_property``
    every node written also gets ``<version_property> = timestamp()``, so the same graph
    can be read by a ``capture = "poll"`` source as well.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379",
        graph: str = "graph",
        *,
        keys: Mapping[str, str] | None = None,
        version_property: str | None = None,
    ) -> None:
        import redis

        self.graph = graph
        self.keys = dict(keys or {})
        self.version_property = version_property
        self._redis = redis.Redis.from_url(url)
        self._stream = outbox_key(graph)
        self._pending: _Pending | None = None

    def close(self) -> None:
        self._redis.close()

    def __enter__(self) -> GraphWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def key_of(self, label: str) -> str:
        return self.keys.get(label, "id")

    # -- nodes ------------------------------------------------------------------------------
    def create_nodes(self, label: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Create new nodes (CREATE: the caller knows the keys are new)."""
        key = self.key_of(label)
        if any(r.get(key) is None for r in rows):
            raise ValueError(f"create {label}: every node needs its key property {key!r}")
        self._write(
            f"UNWIND $rows AS row CREATE (n:{ident(label)}) SET n = row{self._stamp('n')}",
            {"rows": [dict(r) for r in rows]},
            [(label, r[key], "insert", None) for r in rows],
        )

    def upsert_node(self, label: str, properties: Mapping[str, Any]) -> None:
        """Create the node with this key, or set these properties on it."""
        self.upsert_nodes(label, [properties])

    def upsert_nodes(self, label: str, rows: Sequence[Mapping[str, Any]]) -> None:
        key = self.key_of(label)
        if any(r.get(key) is None for r in rows):
            raise ValueError(f"upsert {label}: every node needs its key property {key!r}")
        self._write(
            f"UNWIND $rows AS row MERGE (n:{ident(label)} {{{ident(key)}: row.{ident(key)}}}) "
            f"SET n += row{self._stamp('n')}",
            {"rows": [dict(r) for r in rows]},
            [(label, r[key], "update", None) for r in rows],
        )

    def delete_node(self, label: str, key: Key) -> None:
        self.delete_nodes(label, [key])

    def delete_nodes(self, label: str, keys: Sequence[Key]) -> None:
        """Delete the nodes and their relationships. Records built from them (a chunk that
        listed a deleted entity) are re-synced by vectorsync, which remembers them."""
        self._write(
            f"MATCH (n:{ident(label)}) WHERE n.{ident(self.key_of(label))} IN $keys "
            "DETACH DELETE n",
            {"keys": list(keys)},
            [(label, k, "delete", None) for k in keys],
        )

    # -- relationships ----------------------------------------------------------------------
    def relate(
        self,
        source: NodeRef,
        rel_type: str,
        target: NodeRef,
        properties: Mapping[str, Any] | None = None,
    ) -> None:
        """Create the relationship (once) between two existing nodes."""
        self.relate_many(source[0], rel_type, target[0], [(source[1], target[1])], properties)

    def relate_many(
        self,
        source_label: str,
        rel_type: str,
        target_label: str,
        pairs: Sequence[tuple[Key, Key]],
        properties: Mapping[str, Any] | None = None,
    ) -> None:
        a, b = ident(source_label), ident(target_label)
        ka, kb = ident(self.key_of(source_label)), ident(self.key_of(target_label))
        self._write(
            f"UNWIND $pairs AS p MATCH (a:{a} {{{ka}: p[0]}}), (b:{b} {{{kb}: p[1]}}) "
            f"MERGE (a)-[r:{ident(rel_type)}]->(b) SET r += $props",
            {"pairs": [list(p) for p in pairs], "props": dict(properties or {})},
            self._endpoints(source_label, target_label, pairs, "insert", rel_type),
        )

    def unrelate(self, source: NodeRef, rel_type: str, target: NodeRef) -> None:
        """Delete the relationships of this type from ``source`` to ``target``."""
        a, b = ident(source[0]), ident(target[0])
        ka, kb = ident(self.key_of(source[0])), ident(self.key_of(target[0]))
        self._write(
            f"MATCH (a:{a} {{{ka}: $a}})-[r:{ident(rel_type)}]->(b:{b} {{{kb}: $b}}) DELETE r",
            {"a": source[1], "b": target[1]},
            self._endpoints(source[0], target[0], [(source[1], target[1])], "delete", rel_type),
        )

    @staticmethod
    def _endpoints(
        a: str, b: str, pairs: Sequence[tuple[Key, Key]], op: str, rel_type: str
    ) -> list[_Entry]:
        return [e for ka, kb in pairs for e in ((a, ka, op, rel_type), (b, kb, op, rel_type))]

    # -- anything else ----------------------------------------------------------------------
    def execute(
        self,
        query: str,
        params: Mapping[str, Any] | None = None,
        *,
        changed: Iterable[NodeRef] = (),
        deleted: Iterable[NodeRef] = (),
    ) -> None:
        """Run any Cypher write; name the nodes it changed (or deleted) so vectorsync
        re-syncs them. A node left out is not re-synced until its next recorded change
        (or a ``vectorsync check --repair``)."""
        entries: list[_Entry] = [(label, key, "update", None) for label, key in changed]
        entries += [(label, key, "delete", None) for label, key in deleted]
        self._write(query, dict(params or {}), entries)

    # -- transactions -----------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Collect the writes made inside the block and run them, with their outbox
        entries, in one MULTI/EXEC when it ends (nothing is sent if it raises)."""
        if self._pending is not None:
            yield  # nested: part of the outer transaction
            return
        self._pending = _Pending()
        try:
            yield
            pending = self._pending
        finally:
            self._pending = None
        self._commit(pending)

    def _write(self, query: str, params: dict[str, Any], entries: list[_Entry]) -> None:
        if self._pending is not None:
            self._pending.queries.append((query, params))
            self._pending.entries.extend(entries)
            return
        self._commit(_Pending(queries=[(query, params)], entries=entries))

    def _commit(self, pending: _Pending) -> None:
        from falkordb.helpers import stringify_param_value

        if not pending.queries:
            return
        with wrap_errors(f"write to graph {self.graph!r}", who="graph writer"):
            pipe = self._redis.pipeline(transaction=True)
            for query, params in pending.queries:
                header = " ".join(f"{k}={stringify_param_value(v)}" for k, v in params.items())
                text = f"CYPHER {header} {query}" if params else query
                pipe.execute_command(  # type: ignore[no-untyped-call]
                    "GRAPH.QUERY", self.graph, text, "--compact"
                )
            for label, key, op, rel in pending.entries:
                pipe.xadd(self._stream, encode_entry(label, key, op, rel))  # type: ignore[arg-type]
            results = pipe.execute(raise_on_error=False)
        errors = [r for r in results[: len(pending.queries)] if isinstance(r, Exception)]
        if errors:
            raise GraphWriteError(f"graph {self.graph!r}: FalkorDB refused a write: {errors[0]}")

    def _stamp(self, var: str) -> str:
        if self.version_property is None:
            return ""
        return f", {var}.{ident(self.version_property)} = timestamp()"
