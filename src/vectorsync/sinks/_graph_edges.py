"""Relationships the graph sinks keep from payload fields (``[[mappings.edges]]``).

An edge leaves each node of a mapping's collection for every node whose key its payload
field ``field`` holds (a key, or a list of keys): a node of another collection of the same
sink, matched on ``_vs_key`` (``to``), or a node of a label of the user's, merged by its key
property (``label``/``key``). Edges are written after the nodes, by ``MERGE`` (a batch
applied twice leaves one edge), in Cypher both stores share:

* a written node drops its edges of that type to targets its field no longer names, then
  merges one to each target it names that exists (a ``label`` target is created);
* a node written to a ``to`` collection gets the edges of the nodes already naming its key
  (the targets may be synced after the nodes pointing at them);
* a deleted node's edges go with it (``DETACH DELETE``); ``label`` targets stay.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..sources.cypher import ident
from ._graph_values import ID

if TYPE_CHECKING:
    from ..config import Config, MappingConfig

__all__ = [
    "RECORD_KEY",
    "EdgeSpec",
    "backlink_query",
    "base_collection",
    "edge_rows",
    "edge_specs",
    "keys_of",
    "link_query",
    "unlink_query",
]

RECORD_KEY = "_vs_key"  # a node's record key, in every point's payload
_VERSION = re.compile(r"__v\d+$")  # an index version's collection: <alias>__v<N>


@dataclass(frozen=True, slots=True, kw_only=True)
class EdgeSpec:
    """One declared relationship: nodes of ``source`` -[:type]-> the nodes ``field`` names."""

    source: str  # the collection, as the mapping names it (an alias once it has versions)
    type: str
    field: str
    to: str | None = None  # a collection of the same sink: targets matched on _vs_key
    label: str | None = None  # else a label of the user's: targets merged by ``key``
    key: str = RECORD_KEY
    many: bool = False  # the field holds a list (a related field with many = true)

    @property
    def target_key(self) -> str:
        return RECORD_KEY if self.to is not None else self.key


def edge_specs(config: Config, sink: str) -> tuple[EdgeSpec, ...]:
    """The relationships the mappings written to ``sink`` declare."""
    from ..config import edge_target

    specs: list[EdgeSpec] = []
    for m in config.mappings:
        if m.sink != sink:
            continue
        lists = {out for rel in m.related if rel.many for out in rel.fields}
        for e in m.edges:
            specs.append(
                EdgeSpec(
                    source=m.collection_name,
                    type=e.type,
                    field=e.field,
                    to=_collection(edge_target(config, e.to, sink)) if e.to is not None else None,
                    label=e.label,
                    key=e.key if e.label is not None else RECORD_KEY,
                    many=e.field in lists,
                )
            )
    return tuple(specs)


def _collection(m: MappingConfig | None) -> str:
    assert m is not None  # the config checked it (config._edges)
    return m.collection_name


def base_collection(name: str) -> str:
    """The collection a name stands for: an index version ``articles__v2`` is ``articles``."""
    return _VERSION.sub("", name)


def keys_of(value: Any) -> list[Any]:
    """The target keys a payload value names: none for None, each item of a list."""
    items = value if isinstance(value, list) else [value]
    keys = [v for v in items if isinstance(v, int | str) and not isinstance(v, bool)]
    return list(dict.fromkeys(keys))


def unlink_query(source: str, spec: EdgeSpec, target: str) -> str:
    """Drop the edges of ``$rows`` (``{id, keys}``) to targets their keys no longer name."""
    return (
        f"UNWIND $rows AS r MATCH (n:{ident(source)} {{{ID}: r.id}})"
        f"-[e:{ident(spec.type)}]->(t:{ident(target)}) "
        f"WHERE NOT t.{ident(spec.target_key)} IN r.keys DELETE e"
    )


def link_query(source: str, spec: EdgeSpec, target: str) -> str:
    """Merge an edge from each node of ``$rows`` to each target its keys name."""
    find = "MERGE" if spec.label is not None else "MATCH"
    return (
        f"UNWIND $rows AS r MATCH (n:{ident(source)} {{{ID}: r.id}}) UNWIND r.keys AS k "
        f"{find} (t:{ident(target)} {{{ident(spec.target_key)}: k}}) "
        f"MERGE (n)-[:{ident(spec.type)}]->(t)"
    )


def backlink_query(source: str, spec: EdgeSpec, target: str, is_list: str) -> str:
    """Merge the edges of the ``source`` nodes naming the keys ``$keys`` of targets just
    written (``is_list`` is the dialect's list test)."""
    field = f"s.{ident(spec.field)}"
    if spec.many:
        naming = (
            f"MATCH (s:{ident(source)}) WHERE any(x IN CASE WHEN {is_list.format(field)} "
            f"THEN {field} ELSE [] END WHERE x = k)"
        )
    else:
        naming = f"MATCH (s:{ident(source)} {{{ident(spec.field)}: k}})"
    return (
        f"UNWIND $keys AS k MATCH (t:{ident(target)} {{{RECORD_KEY}: k}}) {naming} "
        f"MERGE (s)-[:{ident(spec.type)}]->(t)"
    )


def edge_rows(spec: EdgeSpec, payloads: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``{id, keys}`` per node id, from its (new) payload."""
    return [{"id": pid, "keys": keys_of(p.get(spec.field))} for pid, p in payloads.items()]
