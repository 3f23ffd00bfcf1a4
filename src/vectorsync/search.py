"""Searching a mapping: payload filters (``where``) checked against the mapping's payload
fields and their index types, and the hits' keys and current texts."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .embed.base import Embedder
from .embed.named import SEPARATOR, NamedVectors
from .errors import ConfigError
from .model import Condition, ConditionOp, Key, SparseVector
from .sinks.base import Hit, IndexType, NamedSearch, Sink

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["Where", "conditions", "find", "nearest", "results"]

# what engine.search(where=...) takes: {"author": "ann", "published": {">=": 2025}},
# ["author=ann", "published>=2025"], or Condition values
Where = Mapping[str, Any] | Sequence[str | Condition]

_EXPRESSION = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_\-]*)\s*(>=|<=|!=|==|=|>|<)\s*(.*?)\s*$")
_OPS: dict[str, ConditionOp] = {
    "=": "eq",
    "==": "eq",
    "!=": "ne",
    ">": "gt",
    ">=": "gte",
    "<": "lt",
    "<=": "lte",
}
_NUMERIC = ("integer", "float")


def conditions(
    mapping: str, where: Where | None, fields: Mapping[str, IndexType | None]
) -> list[Condition]:
    """``where`` as conditions on the mapping's payload ``fields`` (name → index type),
    values typed like the field; ConfigError naming the condition and the fix."""
    if not where:
        return []
    found: list[Condition] = []
    if isinstance(where, Mapping):
        for name, value in where.items():
            if isinstance(value, Mapping):
                found += [_condition(mapping, name, op, v, fields) for op, v in value.items()]
            else:
                found.append(_condition(mapping, name, "=", value, fields))
        return found
    for item in where:
        if isinstance(item, Condition):
            found.append(_condition(mapping, item.field, item.op, item.value, fields))
            continue
        match = _EXPRESSION.match(item)
        if match is None:
            raise ConfigError(
                f"search filter {item!r}: write FIELD=VALUE, FIELD!=VALUE or a comparison "
                "such as published>=2025"
            )
        name, op, raw = match.groups()
        found.append(_condition(mapping, name, op, _typed(raw, fields.get(name)), fields))
    return found


def _condition(
    mapping: str, name: str, op: str, value: Any, fields: Mapping[str, IndexType | None]
) -> Condition:
    if name not in fields:
        listed = ", ".join(sorted(fields)) or "none"
        raise ConfigError(
            f"search filter on {name!r}: not a payload field of mapping {mapping!r} "
            f"(payload fields: {listed})"
        )
    kind = _OPS.get(op) or next((k for k in _OPS.values() if k == op), None)
    if kind is None:
        raise ConfigError(f"search filter on {name!r}: unknown comparison {op!r}")
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if kind not in ("eq", "ne") and (fields[name] not in _NUMERIC or not numeric):
        raise ConfigError(
            f"search filter {name}{op}{value!r}: ranges need a number on a numeric payload "
            f"field; {name!r} is indexed as {fields[name] or 'nothing'}"
        )
    return Condition(field=name, op=kind, value=value)


def _typed(raw: str, kind: IndexType | None) -> Any:
    """A filter value from the command line, typed like the field it compares."""
    text = raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"" else raw
    try:
        if kind == "integer":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise ConfigError(f"search filter value {raw!r}: a number is needed here") from None
    if kind == "bool" and text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def hit_key(payload: Mapping[str, Any]) -> Key | None:
    key = payload.get("_vs_key")
    return key if isinstance(key, int | str) else None


def results(hits: Sequence[Hit], texts: Mapping[Key, str]) -> list[dict[str, Any]]:
    """Hits as a person reads them: rank, score, the record's key and current text, and
    its payload without vectorsync's bookkeeping fields (``_vs_*``)."""
    found = []
    for rank, hit in enumerate(hits, 1):
        payload = hit.record.payload
        key = hit_key(payload)
        text = texts.get(key) if key is not None else None
        entry: dict[str, Any] = {
            "rank": rank,
            "score": round(hit.score, 6),
            "key": key,
            "text": text,
            "payload": {k: v for k, v in payload.items() if not k.startswith("_vs_")},
            "id": hit.record.id,
        }
        if "chunk_index" in payload:  # a chunk point: its own text, and where it is
            start, end = payload.get("chunk_start"), payload.get("chunk_end")
            entry["chunk"] = {
                "index": payload["chunk_index"],
                "count": payload.get("chunk_count"),
                "start": start,
                "end": end,
            }
            if "chunk_text" in payload:
                entry["text"] = payload["chunk_text"]
            elif text is not None and isinstance(start, int) and isinstance(end, int):
                entry["text"] = text[start:end]
        found.append(entry)
    return found


async def nearest(
    mapping: str,
    embedder: Embedder,
    sink: Sink,
    collection: str,
    text: str,
    limit: int,
    where: Sequence[Condition],
    vector: str | None,
    hybrid: bool = False,
) -> list[Hit]:
    """The ``limit`` points nearest to ``text`` (by the named ``vector``, where the mapping
    has several: None is the first); ``hybrid``: that dense vector's and the mapping's
    sparse vector's hits, fused by reciprocal rank."""
    if not isinstance(embedder, NamedVectors):
        if vector is not None or hybrid:
            raise ConfigError(
                f"mapping {mapping!r} has one vector: search it without a vector name or "
                "hybrid (several named vectors, a sparse one among them, are declared with "
                "[[mappings.vectors]])"
            )
        [plain] = await embedder.embed([text])
        return await sink.search(collection, plain, limit, where)
    try:
        part = embedder.part(vector)
    except KeyError as exc:
        raise ConfigError(f"mapping {mapping!r}: {exc.args[0]}") from None
    if not isinstance(sink, NamedSearch):  # config validation keeps this from happening
        raise ConfigError(f"mapping {mapping!r}: sink {sink.name!r} has no named vectors")
    if hybrid:
        if not embedder.sparse or part.sparse is not None:
            raise ConfigError(
                f"mapping {mapping!r}: a hybrid search needs a sparse vector (an embedder of "
                'kind = "sparse" in [[mappings.vectors]]) and a dense one to search by'
            )
        _, sparse_part = embedder.sparse[0]
        assert sparse_part.sparse is not None
        [dense] = await part.embedder.embed([text])
        return await sink.search_hybrid(
            collection,
            (part.name, dense),
            (sparse_part.name, sparse_part.sparse.query(text)),
            limit,
            where,
        )
    if part.sparse is not None:
        query: Sequence[float] | SparseVector = part.sparse.query(text)
    else:
        [query] = await part.embedder.embed([text])
    return await sink.search_vector(collection, part.name, query, limit, where)


async def find(
    engine: Engine,
    mapping: str,
    text: str,
    limit: int,
    where: Where | None,
    vector: str | None = None,
    hybrid: bool = False,
) -> list[dict[str, Any]]:
    """Search and present the hits (the CLI and /api/search); a mapping with named vectors
    shows each hit's text of the vector searched."""
    hits = await engine.search(mapping, text, limit, where=where, vector=vector, hybrid=hybrid)
    keys = [k for h in hits if (k := hit_key(h.record.payload)) is not None]
    texts = await engine.texts(mapping, keys)
    embedder = engine.embedders[engine.mapping(mapping).embedder]
    if isinstance(embedder, NamedVectors):
        at = embedder.parts.index(embedder.part(vector))
        texts = {k: t.split(SEPARATOR)[at] for k, t in texts.items()}
    return results(hits, texts)
