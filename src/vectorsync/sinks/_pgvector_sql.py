"""What the pgvector sink says in SQL, and how it reads the answers: error classes, the
catalog entries its table comments hold, payload conditions, vectors as text."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
from psycopg import sql

from ..errors import PermanentError, SinkError
from ..model import Condition, SinkRecord, dumps
from ..redact import redact
from ..sources.postgres import derived_name
from .base import Distance

MIN_VERSION = (0, 7, 0)  # l2_normalize
ITERATIVE_SCAN = (0, 8, 0)  # hnsw.iterative_scan: filtered searches still fill ``limit``
HNSW_MAX_DIMENSION = 2000
OPCLASS = {"cosine": "vector_cosine_ops", "dot": "vector_ip_ops", "euclid": "vector_l2_ops"}
ORDER = {"cosine": "<=>", "dot": "<#>", "euclid": "<->"}
SCORE = {"cosine": "1 - ({d})", "dot": "-({d})", "euclid": "{d}"}
RANGE = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
# 08 connection, 40 rollback (serialization, deadlock), 53 resources (disk full, too many
# connections), 57 operator intervention (shutdown, cancel), 58 system (I/O)
RETRYABLE = ("08", "40", "53", "57", "58", "55P03", "55006")
MARK = "vectorsync"  # the key of our table and view comments


def table_name(collection: str) -> str:
    """The table (or view) of a collection (or alias): its name when it fits in 63 bytes."""
    return derived_name(collection)


@contextlib.contextmanager
def wrap_errors(sink: str, what: str) -> Iterator[None]:
    """Connection loss, locks, a full disk and shutdowns are retryable; anything else the
    server refused (a bad vector, a payload jsonb cannot hold) is permanent."""
    try:
        yield
    except (PermanentError, SinkError):
        raise
    except psycopg.Error as exc:
        state = exc.sqlstate
        text = redact(f"sink {sink!r}: {what}: {exc}".strip())
        if state is None or state.startswith(RETRYABLE):
            code = "ENOSPC" if state == "53100" else state
            raise SinkError(text, code=code) from exc
        raise PermanentError(text, code=state) from exc


@dataclass(frozen=True, slots=True)
class Entry:
    """A collection table or an alias view, as its comment describes it."""

    name: str
    table: str
    alias_of: str | None = None
    dimension: int = 0
    distance: Distance = "cosine"


def split(catalog: dict[str, Entry]) -> tuple[set[str], dict[str, str]]:
    """The physical collections, and the aliases with what they name."""
    physical = {n for n, e in catalog.items() if e.alias_of is None}
    aliases = {n: e.alias_of for n, e in catalog.items() if e.alias_of is not None}
    return physical, aliases


def where_sql(conditions: Sequence[Condition]) -> tuple[list[sql.Composable], dict[str, Any]]:
    """Conditions as SQL with Qdrant's meaning: a list matches when one of its items does,
    values of another type never match, a missing field matches only ``ne``. Field names
    are quoted literals, values are parameters."""
    filters: list[sql.Composable] = []
    params: dict[str, Any] = {}
    for i, c in enumerate(conditions):
        if c.op in ("eq", "ne"):
            # containment (served by the GIN index): the value itself, or a list holding it
            params[f"c{i}"] = dumps({c.field: c.value}).decode()
            params[f"l{i}"] = dumps({c.field: [c.value]}).decode()
            match = sql.SQL("(payload @> %({})s::jsonb OR payload @> %({})s::jsonb)").format(
                sql.SQL(f"c{i}"), sql.SQL(f"l{i}")
            )
            filters.append(match if c.op == "eq" else sql.SQL("NOT ") + match)
        else:
            params[f"c{i}"] = dumps({"v": c.value}).decode()
            path = f"$[*] ? (@ {RANGE[c.op]} $v)"  # lax: a scalar is a list of one
            filters.append(
                sql.SQL("jsonb_path_exists(payload -> {}, {}::jsonpath, %({})s::jsonb)").format(
                    sql.Literal(c.field), sql.Literal(path), sql.SQL(f"c{i}")
                )
            )
    return filters, params


def vector_text(vector: Sequence[float]) -> str:
    return orjson.dumps(vector, default=float, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def record(row: tuple[Any, ...]) -> SinkRecord:
    vector = orjson.loads(row[2]) if row[2] is not None else None
    return SinkRecord(id=str(row[0]), payload=dict(row[1] or {}), vector=vector)


def comment_info(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        return None
    return info if isinstance(info, dict) and info.get(MARK) == 1 and "name" in info else None


def version(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)
