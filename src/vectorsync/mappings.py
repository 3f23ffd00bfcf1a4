"""Mappings checked against the live source before anything is written: the columns a
mapping reads (with its related fields and their types) and its relations, resolved."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from .config import MappingConfig, RelatedConfig
from .errors import ConfigError
from .related import Relation, edge_path, node_pattern, pattern_nodes
from .render import template_attributes, template_columns
from .sinks.base import index_type_for
from .sources.base import Source, TableSpec

__all__ = ["check_keys", "check_mapping"]

logger = logging.getLogger(__name__)


async def check_mapping(
    m: MappingConfig,
    source: Source,
    *,
    graph: bool,
    schemaless: bool | None = None,
    edges: bool = False,
) -> tuple[dict[str, str], tuple[Relation, ...]]:
    """The mapping's columns (name → declared type, related fields included) and its
    relations; ConfigError naming the field and the fix when something is not there.
    Graphs (and other ``schemaless`` sources: SurrealDB) accept a property no sampled
    record has; it reads as NULL. With ``edges`` (SurrealDB) a relation is a join or a
    one-hop graph path over an edge table."""
    schemaless = graph if schemaless is None else schemaless
    cols = await source.columns(m.table)
    where = f"mapping {m.name!r}"
    if m.key in cols:
        await source.check_key(TableSpec(table=m.table, key=m.key))
    what = "node label" if graph else "source table"
    relations = tuple(_relation(m, r, graph=graph, edges=edges) for r in m.related)
    for rel in relations:
        cols.update(await _related_columns(m, rel, source, cols))
    listed = f"(columns: {', '.join(c for c in cols if not c.startswith('@'))})"
    used = [
        ("key", m.key),
        *(("text template field", f) for f in sorted(template_columns(m.text))),
        *(("payload field", f) for f in m.payload),
    ]
    for role, field in used:
        if field in cols:
            continue
        if schemaless and (role != "key" or not cols):
            logger.warning(
                "%s: %s %r is not set on any sampled %s record",
                where,
                role,
                field,
                m.table,
                extra={"action": "validate", "mapping": m.name},
            )
            cols[field] = ""
            continue
        if role == "text template field":
            raise ConfigError(
                f"{where}: text template uses {field!r}, not a column of {what} "
                f"{m.table!r} {listed}"
            )
        raise ConfigError(f"{where}: {role} {field!r} not in {what} {m.table!r} {listed}")
    _check_attributes(m, cols)
    return cols, relations


_SCALARS: dict[str, type] = {
    "keyword": str,
    "text": str,
    "datetime": str,  # rendered as ISO text
    "integer": int,
    "float": float,
    "bool": bool,
}


def _check_attributes(m: MappingConfig, cols: Mapping[str, str]) -> None:
    """``{{ body.nosuch }}`` on a text column fails on every row: refuse it here. Columns
    of structured types (JSON, lists, untyped graph properties) may hold anything."""
    for column, attr in template_attributes(m.text):
        kind = index_type_for(cols.get(column, ""))
        scalar = (
            _SCALARS.get(kind) if kind is not None and not cols[column].startswith("LIST") else None
        )
        if scalar is not None and not hasattr(scalar, attr):
            raise ConfigError(
                f"mapping {m.name!r}: text template reads {column}.{attr}, but {column!r} is a "
                f"{cols[column]} column (a {scalar.__name__} has no {attr!r}); write "
                f"{{{{ {column} }}}}, or read {attr!r} from a JSON column"
            )


def check_keys(
    mappings: Sequence[MappingConfig], relations: Mapping[str, Sequence[Relation]]
) -> None:
    """Every use of one table (mapped or related) must key it the same way."""
    keys: dict[tuple[str, str], tuple[str, str]] = {}
    for m in mappings:
        specs = [(m.table, m.key), *((r.table, r.key) for r in relations[m.name])]
        for table, key in specs:
            other, where = keys.setdefault((m.source, table), (key, m.name))
            if other != key:
                raise ConfigError(
                    f"mapping {m.name!r}: table {table!r} is already keyed by {other!r} in "
                    f"mapping {where!r}; every use of one table must use the same key"
                )


def _relation(m: MappingConfig, r: RelatedConfig, *, graph: bool, edges: bool) -> Relation:
    where = f"mapping {m.name!r}: related {r.name!r}"
    fields = tuple(r.fields.items())
    if edges and r.pattern is not None:
        path = edge_path(r.pattern)
        if path is None:
            raise ConfigError(
                f"{where}: pattern {r.pattern!r} must be a one-hop SurrealQL graph path from "
                'the mapped record, e.g. "<-mentions<-entity" or "->wrote->article"'
            )
        edge, table, edge_in = path
        return Relation(
            name=r.name,
            table=table,
            key=r.key,
            fields=fields,
            many=r.many,
            pattern=r.pattern,
            edge=edge,
            edge_in=edge_in,
        )
    if graph != (r.pattern is not None):
        use = "pattern" if graph else "table and on"
        raise ConfigError(f"{where}: source {m.source!r} takes {use} for a relation")
    if r.pattern is None:
        assert r.table is not None and r.on is not None
        [(rc, oc)] = r.on.items()
        return Relation(
            name=r.name, table=r.table, key=r.key, fields=fields, many=r.many, on=(rc, oc)
        )
    assert m.match is not None
    owner_var, _ = node_pattern(m.match)
    nodes = pattern_nodes(r.pattern)
    others = [(v, label) for v, label in nodes if v != owner_var and label]
    if owner_var not in {v for v, _ in nodes} or len(others) != 1 or not others[0][0]:
        raise ConfigError(
            f"{where}: pattern {r.pattern!r} must contain the mapped node ({owner_var}) "
            "and one other node with a variable and a label, e.g. "
            f"(d:Document)-[:HAS_CHUNK]->({owner_var})"
        )
    ((related_var, label),) = others
    return Relation(
        name=r.name,
        table=label,
        key=r.key,
        fields=fields,
        many=r.many,
        pattern=r.pattern,
        owner_var=owner_var,
        related_var=related_var,
    )


async def _related_columns(
    m: MappingConfig, rel: Relation, source: Source, owner: dict[str, str]
) -> dict[str, str]:
    """The types of a relation's fields (list types when ``many``), checked against the
    related table; ``@name`` holds the related keys."""
    where = f"mapping {m.name!r}: related {rel.name!r}"
    cols = await source.columns(rel.table)
    listed = f"(columns: {', '.join(cols)})"
    if rel.on is not None:
        needed = [("key", rel.key), ("on", rel.on[0]), *(("field", c) for _, c in rel.fields)]
        for role, column in needed:
            if column not in cols:
                raise ConfigError(f"{where}: {role} {column!r} not in table {rel.table!r} {listed}")
        if rel.on[1] not in owner:
            raise ConfigError(f"{where}: on {rel.on[1]!r} not in table {m.table!r}")
    types: dict[str, str] = {}
    for out, expr in rel.fields:
        if out in owner:
            raise ConfigError(f"{where}: field {out!r} is also a column of {m.table!r}")
        prop = expr.removeprefix(f"{rel.related_var}.") if rel.pattern else expr
        declared = cols.get(prop, "")
        types[out] = f"LIST<{declared}>" if rel.many and declared else declared
    return {**types, rel.deps_column: "LIST"}
