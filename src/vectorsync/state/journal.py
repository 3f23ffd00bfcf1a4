"""The write API's write-ahead journal (see writer.py): entries of one source transaction."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Connection, delete, select

from ..model import dumps
from . import schema as s

__all__ = ["Entry", "add", "entries", "remove"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """One journaled write: ``row`` the values upserted (None: a delete), ``before`` the
    row as it was (None: there was none)."""

    source: str
    txn: str
    table: str
    key: Any
    op: str
    row: dict[str, Any] | None
    before: dict[str, Any] | None
    holder: str = ""  # the writing engine (instance id), on host, in process pid
    host: str = ""
    pid: int = 0
    created_at: float = 0.0
    id: int | None = None


def _json(value: Any) -> str | None:
    return None if value is None else dumps(value).decode()


def add(conn: Connection, entries: Sequence[Entry]) -> None:
    now = time.time()
    conn.execute(
        s.write_journal.insert(),
        [
            {
                "source": e.source,
                "txn": e.txn,
                "table_name": e.table,
                "key": _json(e.key),
                "op": e.op,
                "row": _json(e.row),
                "before": _json(e.before),
                "holder": e.holder,
                "host": e.host,
                "pid": e.pid,
                "created_at": now,
            }
            for e in entries
        ],
    )


def entries(conn: Connection, source: str | None) -> list[Entry]:
    t = s.write_journal
    query = select(t).order_by(t.c.id)
    if source is not None:
        query = query.where(t.c.source == source)
    return [
        Entry(
            id=r["id"],
            source=r["source"],
            txn=r["txn"],
            table=r["table_name"],
            key=orjson.loads(r["key"]),
            op=r["op"],
            row=None if r["row"] is None else orjson.loads(r["row"]),
            before=None if r["before"] is None else orjson.loads(r["before"]),
            holder=r["holder"],
            host=r["host"],
            pid=r["pid"],
            created_at=r["created_at"],
        )
        for r in conn.execute(query).mappings()
    ]


def remove(conn: Connection, txn: str) -> None:
    conn.execute(delete(s.write_journal).where(s.write_journal.c.txn == txn))
