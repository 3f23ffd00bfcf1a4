"""Related fields: values a mapping pulls from other records of its source — a SQL join
(a chunk's document title) or a Cypher pattern (the entities that mention a chunk).

Related fields become extra columns of the mapped row before it is rendered, so templates,
payloads, hashes and consistency checks treat them like any column. Each row also gets a
``@<relation>`` column listing the related keys it was built from: it is part of the row
digest and is kept in the state store (``record_deps``), so that when a related record
changes or disappears exactly the records built from it are synced again (fan-out).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .model import Key

if TYPE_CHECKING:
    from .sources.base import Source, TableSpec

__all__ = [
    "EDGE",
    "RelatedRecord",
    "Relation",
    "edge_path",
    "key_order",
    "node_pattern",
    "pattern_nodes",
    "resolve",
]

RelatedRecord = tuple[Key, Mapping[str, Any]]  # (related key, field → value)
# a related record's field naming the edge it was reached through (``<edge table>:<key>``):
# it joins the ``@relation`` key list, so that an edge deleted (a change feed entry that
# holds only the edge's id) re-syncs the records built from it
EDGE = "@edge"
_EDGE_PATH = re.compile(r"(<-|->)([A-Za-z_]\w*)(<-|->)([A-Za-z_]\w*)")

_NODE = re.compile(r"\(\s*([A-Za-z_]\w*)?\s*(?::\s*`?([A-Za-z_][\w]*)`?)?[^)]*\)")


@dataclass(frozen=True, slots=True, kw_only=True)
class Relation:
    """One ``[[mappings.related]]`` declaration, resolved.

    SQL sources join ``table`` on ``on`` = (related column, owner column); graph sources
    match ``pattern``, in which ``owner_var`` is the mapped node and ``related_var`` the
    related one. ``fields`` are (output name, column or Cypher expression) pairs; with
    ``many`` each output is a list in related-key order, else the first related record's
    value (or None).
    """

    name: str
    table: str
    key: str
    fields: tuple[tuple[str, str], ...]
    many: bool = False
    on: tuple[str, str] | None = None
    pattern: str | None = None
    owner_var: str = ""
    related_var: str = ""
    # SurrealDB graph edges (``pattern = "<-mentions<-entity"``): the edge table, and whether
    # the related record is the edge's ``in`` (the mapped one its ``out``) or the reverse
    edge: str | None = None
    edge_in: bool = False

    @property
    def deps_column(self) -> str:
        return f"@{self.name}"

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.fields)


def node_pattern(match: str) -> tuple[str, str]:
    """``(c:DocumentChunk)`` → (variable, label)."""
    found = _NODE.fullmatch(match.strip())
    if found is None or not found.group(1) or not found.group(2):
        raise ValueError(
            f"match {match!r}: write one node pattern with a variable and a label, "
            'e.g. match = "(c:DocumentChunk)"'
        )
    return found.group(1), found.group(2)


def edge_path(pattern: str) -> tuple[str, str, bool] | None:
    """A one-hop SurrealQL graph path from the mapped record → (edge table, related table,
    whether the related record is the edge's ``in``): ``<-mentions<-entity`` →
    (mentions, entity, True); ``->wrote->article`` → (wrote, article, False)."""
    found = _EDGE_PATH.fullmatch(pattern.replace(" ", ""))
    if found is None or found.group(1) != found.group(3):
        return None
    return found.group(2), found.group(4), found.group(1) == "<-"


def pattern_nodes(pattern: str) -> list[tuple[str, str | None]]:
    """The (variable, label) of every node in a Cypher path pattern."""
    return [(m.group(1) or "", m.group(2)) for m in _NODE.finditer(pattern)]


def key_order(key: Key) -> tuple[str, Any]:
    """A total order over keys of mixed types (integers before strings)."""
    return (type(key).__name__, key)


async def resolve(
    source: Source,
    owner: TableSpec,
    relations: Sequence[Relation],
    rows: Mapping[Key, dict[str, Any]],
    *,
    columns: Sequence[str] = (),
) -> None:
    """Complete rows in place: absent ``columns`` read as None (a graph node lacks the
    properties never set on it), then every relation's fields and ``@name`` key list."""
    for row in rows.values() if columns else ():
        for column in columns:
            row.setdefault(column, None)
    if not relations or not rows:
        return
    keys = list(rows)
    for rel in relations:
        found = await source.related(owner, rel, keys)
        for key, row in rows.items():
            records = sorted(found.get(key, ()), key=lambda r: key_order(r[0]))
            edges = sorted(str(fields[EDGE]) for _, fields in records if EDGE in fields)
            row[rel.deps_column] = [*(k for k, _ in records), *edges]
            for out, _ in rel.fields:
                values = [fields.get(out) for _, fields in records]
                row[out] = values if rel.many else (values[0] if values else None)
