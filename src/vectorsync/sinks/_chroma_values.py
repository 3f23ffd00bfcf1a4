"""Payloads as Chroma metadata and conditions as Chroma ``where`` filters.

Chroma metadata holds str, int (64-bit), float, bool and non-empty lists of one of those
types. A payload value of that shape is stored as it is, so Chroma filters it and a reader
with Chroma's own client sees it plainly. Anything else — None, an empty list, a list of
mixed types or of objects, an object — is stored as its JSON text under the same key, and
the key is listed in the reserved metadata field ``_vs_json``; reading back decodes those
keys, so a payload round-trips exactly. JSON-encoded fields cannot be filtered on.

Chroma never stores a metadata value of None: an ``update`` with None *removes* the key
(that is how a removed payload field is dropped), and ``add`` with a NaN drops the whole
metadata. So None is stored as JSON ``null``, and NaN, infinity and integers outside 64 bits
are refused (``render`` refuses them before they get here, for records from a source).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import PermanentError
from ..model import Condition

__all__ = ["JSON_KEY", "from_metadata", "to_metadata", "where_filter"]

JSON_KEY = "_vs_json"
_INT64 = 2**63
_SCALARS = (str, int, float, bool)


def to_metadata(sink: str, pid: str, payload: Mapping[str, Any]) -> dict[str, Any] | None:
    """The Chroma metadata of a payload (None for an empty one: Chroma refuses ``{}``).
    PermanentError naming the point and the field for what no metadata can hold."""
    meta: dict[str, Any] = {}
    encoded: list[str] = []
    for key, value in payload.items():
        _check_key(sink, pid, key)
        if _native(value):
            meta[key] = value
            continue
        try:
            meta[key] = json.dumps(value, allow_nan=False, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise PermanentError(
                f"sink {sink!r}: point {pid}: payload field {key!r} holds {_shown(value)}, "
                f"which Chroma metadata cannot hold ({exc}); store a number, text, bool or "
                "JSON-serialisable list or object"
            ) from None
        encoded.append(key)
    if encoded:
        meta[JSON_KEY] = sorted(encoded)
    return meta or None


def from_metadata(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """The payload a metadata dict was made from (:func:`to_metadata` reversed)."""
    if not meta:
        return {}
    encoded = set(meta.get(JSON_KEY) or ())
    return {
        k: json.loads(v) if k in encoded and isinstance(v, str) else _plain(v)
        for k, v in meta.items()
        if k != JSON_KEY
    }


def _check_key(sink: str, pid: str, key: Any) -> None:
    if not isinstance(key, str) or key == JSON_KEY or key.startswith(("#", "$", "chroma:")):
        raise PermanentError(
            f"sink {sink!r}: point {pid}: payload field {key!r} cannot be a Chroma metadata "
            f"key ({JSON_KEY!r}, keys starting with '#' or '$' and 'chroma:' are reserved); "
            "rename the field"
        )


def _native(value: Any) -> bool:
    """Chroma stores the value as it is and gives it back unchanged."""
    if isinstance(value, list):
        if not value or not all(_scalar(v) for v in value):
            return False
        kinds = {bool if isinstance(v, bool) else type(v) for v in value}
        return len(kinds) == 1
    return _scalar(value)


def _scalar(value: Any) -> bool:
    if isinstance(value, bool | str):
        return True
    if isinstance(value, int):
        return -_INT64 <= value < _INT64  # a larger one comes back as a float
    return isinstance(value, float) and math.isfinite(value)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _shown(value: Any) -> str:
    text = repr(value)
    return f"a {type(value).__name__} ({text[:60]}{'…' if len(text) > 60 else ''})"


def where_filter(sink: str, where: Sequence[Condition]) -> dict[str, Any] | None:
    """Conditions as one Chroma ``where`` (all must hold), with Qdrant's meaning: ``eq``
    matches a value or a list holding it; ``ne`` matches neither (nor a missing field);
    a range compares numbers (a list never meets one)."""
    parts = [_condition(sink, c) for c in where]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else {"$and": parts}


def _condition(sink: str, c: Condition) -> dict[str, Any]:
    value = c.value
    if c.op in ("eq", "ne"):
        if not _scalar(value):
            raise PermanentError(
                f"sink {sink!r}: condition {c.field} {c.op} {value!r}: Chroma filters on a "
                "text, number or bool only"
            )
        if c.op == "eq":  # $eq never matches inside a list, $contains only inside one
            return {"$or": [{c.field: {"$eq": value}}, {c.field: {"$contains": value}}]}
        return {"$and": [{c.field: {"$ne": value}}, {c.field: {"$not_contains": value}}]}
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PermanentError(
            f"sink {sink!r}: condition {c.field} {c.op} {value!r}: Chroma compares numbers "
            "only; give a number"
        )
    return {c.field: {f"${c.op}": value}}
