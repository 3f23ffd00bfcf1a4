"""Plain values passed through the core: changes, record state, points."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
import xxhash

__all__ = [
    "NAMESPACE",
    "Change",
    "ChunkRef",
    "Condition",
    "InvalidText",
    "Key",
    "Op",
    "PayloadUpdate",
    "Point",
    "RecordState",
    "Row",
    "SinkRecord",
    "SparseVector",
    "content_hash",
    "payload_hash",
    "point_id",
]

Key = int | str
# one chunk point of a record: (point id, content hash of its text — "" when unknown, so it
# is rewritten —, start, end of its span in the record's text)
ChunkRef = tuple[str, str, int, int]
Row = Mapping[str, Any]
Op = Literal["insert", "update", "delete", "snapshot", "replay", "truncate"]

# Fixed forever: changing it would orphan every point ever written.
NAMESPACE = uuid.UUID("6f1c1a52-5b0e-4b7e-9d8a-7c2f3e9a4d10")
_NS_BYTES = NAMESPACE.bytes


class InvalidText(bytes):
    """A TEXT value that is not valid UTF-8, kept as its bytes so the record can be
    dead-lettered with a clear reason instead of failing the whole read."""


def decode_text(raw: bytes) -> str | InvalidText:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return InvalidText(raw)


def point_id(mapping: str, key: Key) -> str:
    """Deterministic point id: ``uuid5(NAMESPACE, mapping + "\\x1f" + key)`` (the unit
    separator cannot occur in a mapping name). Computed directly: ``uuid.uuid5`` builds
    two UUID objects per call, a hot spot at tens of thousands of keys per second."""
    return uuid5_text(_NS_BYTES, f"{mapping}\x1f{key}".encode())


def uuid5_text(namespace: bytes, name: bytes) -> str:
    """``str(uuid.uuid5(UUID(bytes=namespace), name))`` without building UUID objects."""
    digest = bytearray(hashlib.sha1(namespace + name).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


DIGEST_BUCKETS = 4096


def key_bucket(key: Key) -> int:
    """The digest bucket of a key (the same on every side of a consistency check)."""
    return xxhash.xxh3_64_intdigest(str(key).encode()) & (DIGEST_BUCKETS - 1)


def row_digest(row: Mapping[str, Any], columns: Sequence[str]) -> int:
    """A 62-bit digest of the raw values a mapping reads from a row. Kept split into two
    31-bit halves in the state store, so per-bucket SUMs in SQL never overflow."""
    raw = dumps([row.get(c) for c in columns])
    return xxhash.xxh3_64_intdigest(raw) & ((1 << 62) - 1)


_INT64 = 2**63


def dumps(value: Any) -> bytes:
    """JSON of any value a source can hand us: what orjson cannot write (integers over 64
    bits, bytes, other types) is written as its repr, so one odd value never fails a write."""
    try:
        return orjson.dumps(value, default=repr)
    except TypeError:  # an integer over 64 bits, somewhere inside
        return orjson.dumps(json_safe(value), default=repr)


def json_safe(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return value if -_INT64 <= value < _INT64 else repr(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


MAX_KEY_CHARS = 1000  # the state store's key columns
NULL_KEY = "\x00null"  # how a NULL key is named where a key must be text (dead letters)


def key_text(key: Any) -> str:
    """A key as the state store names it: over-long keys are cut, with a digest of the
    whole so two keys never share a name; NULL has a name no text key takes."""
    if key is None:
        return NULL_KEY
    text = str(key)
    if len(text) <= MAX_KEY_CHARS:
        return text
    digest = xxhash.xxh3_64_hexdigest(text.encode(errors="replace"))
    return f"{text[: MAX_KEY_CHARS - 20]}…{digest}"


def content_hash(model: str, text: str) -> str:
    """Hash of everything a vector is a function of: the model and the rendered text."""
    return xxhash.xxh3_128_hexdigest(f"{model}\x1f{text}".encode())


def payload_hash(payload: Mapping[str, Any]) -> str:
    return xxhash.xxh3_128_hexdigest(
        orjson.dumps(payload, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Change:
    """A key of a source table changed at ``position`` (totally ordered per source)."""

    table: str
    key: Key
    op: Op
    position: int
    committed_at: float = 0.0
    relation: str | None = None  # graph: the relationship type whose edge changed


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordState:
    """What we last wrote for a key."""

    mapping: str
    key: str
    point_id: str
    text_hash: str
    payload_hash: str
    source_version: int
    schema_version: str
    synced_at: float
    payload: Mapping[str, Any] = field(default_factory=dict, compare=False)  # as last written
    row_digest: int = 0  # of the source row's used columns, as last synced (see row_digest)
    # relation name → the related keys the record was built from (None: no relations)
    deps: Mapping[str, tuple[str, ...]] | None = field(default=None, compare=False)
    # a chunked record's points, in order (None: the record is one point, ``point_id``)
    chunks: tuple[ChunkRef, ...] | None = field(default=None, compare=False)

    @property
    def point_ids(self) -> list[str]:
        """Every point the record was written as."""
        return [c[0] for c in self.chunks] if self.chunks is not None else [self.point_id]


@dataclass(frozen=True, slots=True, kw_only=True)
class SparseVector:
    """A sparse vector: the non-zero dimensions and their values."""

    indices: list[int]
    values: list[float]


@dataclass(frozen=True, slots=True, kw_only=True)
class Point:
    id: str
    vector: list[float]
    payload: dict[str, Any]
    sparse: Mapping[str, SparseVector] = field(default_factory=dict)  # named sparse vectors
    # named dense vectors beside the concatenation (sinks.base.VectorSpec.extra): the
    # foreign vector conflicts' keep_both keeps
    extra: Mapping[str, list[float]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class PayloadUpdate:
    """Set some payload fields of a point and remove others, keeping its vector."""

    id: str
    set: dict[str, Any]
    unset: tuple[str, ...] = ()
    payload: dict[str, Any] = field(default_factory=dict)  # the whole new payload


@dataclass(frozen=True, slots=True, kw_only=True)
class SinkRecord:
    """A point as read back from a sink."""

    id: str
    payload: dict[str, Any]
    vector: list[float] | None = field(default=None, repr=False)
    extra: dict[str, list[float]] = field(default_factory=dict, repr=False)  # Point.extra


ConditionOp = Literal["eq", "ne", "gt", "gte", "lt", "lte"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Condition:
    """One payload filter of a search: ``field op value`` (all conditions must hold)."""

    field: str
    op: ConditionOp
    value: Any
