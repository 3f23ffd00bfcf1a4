"""Payloads as graph node properties and conditions as Cypher, for the graph sinks.

A node property holds a text, a 64-bit integer, a float, a bool, or a list of one of those
types (FalkorDB takes mixed and nested lists, Neo4j does not: one rule serves both). A
payload value of that shape is stored as it is, so Cypher readers see it plainly and
filters work on it. Anything else — None (Cypher drops a property set to null), a map, a
list of mixed types, of maps or with a null — is stored as its JSON text under the same
key, and the key is listed in the node's ``_vs_json`` list; reading back decodes those
keys, so a payload round-trips exactly. JSON-encoded fields cannot be filtered on.
NaN, infinity and integers outside 64 bits are refused (FalkorDB's client would clamp an
integer silently), naming the point and the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import PermanentError
from ..model import Condition

__all__ = [
    "ID",
    "JSON_KEY",
    "RESERVED",
    "VECTOR",
    "cypher_where",
    "from_properties",
    "to_properties",
]

ID, VECTOR, JSON_KEY = "_vs_id", "_vs_vector", "_vs_json"
RESERVED = (ID, VECTOR, JSON_KEY)
_INT64 = 2**63
_RANGE = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


def to_properties(
    sink: str, pid: str, payload: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """The node properties of a payload, and the keys stored as JSON text."""
    props: dict[str, Any] = {}
    encoded: list[str] = []
    for key, value in payload.items():
        if not isinstance(key, str) or key in RESERVED or not key or "`" in key:
            raise PermanentError(
                f"sink {sink!r}: point {pid}: payload field {key!r} cannot be a node property "
                f"({', '.join(RESERVED)} are vectorsync's; FalkorDB takes no empty name and "
                "no backtick in one); rename the field"
            )
        _check_numbers(sink, pid, key, value)
        if _native(value):
            props[key] = value
            continue
        try:
            props[key] = json.dumps(value, allow_nan=False, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise PermanentError(
                f"sink {sink!r}: point {pid}: payload field {key!r} holds {_shown(value)}, "
                f"which no node property can hold ({exc}); store a number, text, bool or "
                "JSON-serialisable list or object"
            ) from None
        encoded.append(key)
    return props, sorted(encoded)


def from_properties(props: Mapping[str, Any]) -> dict[str, Any]:
    """The payload a node's properties were made from (:func:`to_properties` reversed)."""
    encoded = set(props.get(JSON_KEY) or ())
    return {
        k: json.loads(v) if k in encoded and isinstance(v, str) else v
        for k, v in props.items()
        if k not in RESERVED
    }


def _native(value: Any) -> bool:
    if isinstance(value, list):
        if not all(_scalar(v) for v in value):
            return False
        return len({bool if isinstance(v, bool) else type(v) for v in value}) <= 1
    return _scalar(value)


def _scalar(value: Any) -> bool:
    return isinstance(value, bool | str | int | float)


def _check_numbers(sink: str, pid: str, key: str, value: Any) -> None:
    """PermanentError for a number no store keeps (anywhere inside the value)."""
    if isinstance(value, bool):
        return
    bad = (isinstance(value, int) and not -_INT64 <= value < _INT64) or (
        isinstance(value, float) and not math.isfinite(value)
    )
    if bad:
        raise PermanentError(
            f"sink {sink!r}: point {pid}: payload field {key!r} holds {value!r}, which a graph "
            "store cannot keep (integers are 64-bit, floats finite); store it as text"
        )
    if isinstance(value, list | tuple):
        for v in value:
            _check_numbers(sink, pid, key, v)
    elif isinstance(value, Mapping):
        for v in value.values():
            _check_numbers(sink, pid, key, v)


def _shown(value: Any) -> str:
    text = repr(value)
    return f"a {type(value).__name__} ({text[:60]}{'…' if len(text) > 60 else ''})"


def cypher_where(
    var: str, conditions: Sequence[Condition], is_list: str = "typeOf({}) = 'List'"
) -> tuple[str, dict[str, Any]]:
    """Conditions on node ``var`` as one Cypher predicate ("" for none) and its parameters,
    with Qdrant's meaning: a list matches when one of its items does, a value of another
    type never matches, a missing field matches only ``ne``. Field names are quoted,
    values are parameters. ``is_list`` tests whether an expression is a list (the
    dialects differ: FalkorDB's ``typeOf``, Neo4j's ``valueType``)."""
    from ..sources.cypher import ident

    parts: list[str] = []
    params: dict[str, Any] = {}
    for i, c in enumerate(conditions):
        prop = f"{var}.{ident(c.field)}"
        items = f"(CASE WHEN {is_list.format(prop)} THEN {prop} ELSE [{prop}] END)"
        op = "=" if c.op in ("eq", "ne") else _RANGE[c.op]
        test = f"any(x IN {items} WHERE x {op} $w{i})"
        parts.append(f"NOT coalesce({test}, false)" if c.op == "ne" else f"coalesce({test}, false)")
        params[f"w{i}"] = c.value
    return " AND ".join(parts), params
