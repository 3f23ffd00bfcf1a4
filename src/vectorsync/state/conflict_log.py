"""The conflict log and the sink values kept over the source's (see conflicts)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from sqlalchemy import Connection, and_, case, func, select

from ..conflicts import Conflict, Kept
from ..model import dumps
from ..redact import redact_value
from . import schema as s

__all__ = ["close", "conflicts", "counts", "kept", "log", "mark", "set_kept"]


def log(conn: Connection, entries: Sequence[Conflict]) -> list[Conflict]:
    """Log conflicts; a check's finding already open for the record is not logged twice,
    and the sync resolving a record closes the check's open finding. The ones logged."""
    t = s.conflicts
    now = time.time()
    logged = []
    for c in entries:
        fields = dumps(redact_value(c.fields)).decode()
        open_ = and_(t.c.mapping == c.mapping, t.c.key == c.key, t.c.status == "open")
        if c.detected == "check":
            if conn.scalar(select(t.c.id).where(open_, t.c.fields == fields)) is not None:
                continue
        else:
            conn.execute(t.update().where(open_).values(status="resolved", resolved_at=now))
        conn.execute(
            t.insert().values(
                mapping=c.mapping,
                key=c.key,
                policy=c.policy,
                resolution=c.resolution,
                detected=c.detected,
                fields=fields,
                status="open" if c.detected == "check" else "resolved",
                created_at=c.at,
                resolved_at=None if c.detected == "check" else now,
            )
        )
        logged.append(c)
    return logged


def counts(conn: Connection) -> list[tuple[str, str, str, int]]:
    t = s.conflicts
    shown = case((t.c.status == "open", "open"), else_=t.c.resolution)
    query = select(t.c.mapping, t.c.policy, shown, func.count()).group_by(
        t.c.mapping, t.c.policy, shown
    )
    return [(m, p, r, int(n)) for m, p, r, n in conn.execute(query)]


def close(conn: Connection, mapping: str, keys: Sequence[str]) -> None:
    t = s.conflicts
    where = and_(t.c.mapping == mapping, t.c.key.in_(list(keys)), t.c.status == "open")
    conn.execute(
        t.update()
        .where(where)
        .values(status="resolved", resolution="source_written", resolved_at=time.time())
    )


def mark(conn: Connection, conflict_id: int, resolution: str) -> None:
    t = s.conflicts
    conn.execute(
        t.update()
        .where(t.c.id == conflict_id)
        .values(status="resolved", resolution=resolution, resolved_at=time.time())
    )


def conflicts(
    conn: Connection,
    *,
    mapping: str | None = None,
    ids: Sequence[int] | None = None,
    status: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    t = s.conflicts
    query = select(t).order_by(t.c.id.desc()).limit(limit)
    if mapping is not None:
        query = query.where(t.c.mapping == mapping)
    if ids is not None:
        query = query.where(t.c.id.in_(list(ids)))
    if status is not None:
        query = query.where(t.c.status == status)
    rows = conn.execute(query).mappings().all()
    return [{**r, "fields": orjson.loads(r["fields"])} for r in rows]


def kept(conn: Connection, mapping: str, keys: Sequence[str] | None) -> dict[str, Kept]:
    """The kept sink values of ``keys`` (None: of every record of the mapping)."""
    t = s.kept_fields
    query = select(t.c.key, t.c.fields).where(t.c.mapping == mapping)
    found: dict[str, Kept] = {}
    chunks = [None] if keys is None else [keys[i : i + 500] for i in range(0, len(keys), 500)]
    for part in chunks:
        q = query if part is None else query.where(t.c.key.in_(list(part)))
        for key, fields in conn.execute(q):
            found[key] = {f: (v[0], v[1]) for f, v in orjson.loads(fields).items()}
    return found


def set_kept(conn: Connection, entries: Mapping[tuple[str, str], Kept | None]) -> None:
    """Replace (or, for None or nothing kept, remove) records' kept sink values."""
    t = s.kept_fields
    for (mapping, key), fields in entries.items():
        conn.execute(t.delete().where(and_(t.c.mapping == mapping, t.c.key == key)))
        if fields:
            value = dumps({f: [v, was] for f, (v, was) in fields.items()}).decode()
            conn.execute(t.insert().values(mapping=mapping, key=key, fields=value))
