"""Index versions in the state store: plain functions over one SQLAlchemy connection, run
in a transaction by :class:`~vectorsync.state.store.StateStore`.

A mapping's vectors are made of a model, a dimension, a distance and a text template; their
digest names an *index version*, held in a physical collection of its own
(``articles__v2``). One version is ``live`` (what the mapping's collection name points at
and searches read), at most one is ``building`` (filled beside it by a backfill while live
changes go to both) and at most one is ``previous`` (kept after a swap, still maintained, so
a rollback is instant). Record state of the live version is kept under the mapping's name;
the others under ``mapping@vN`` (a swap renames them in the same transaction).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from sqlalchemy import Connection, select, update

from ..model import Key, dumps
from ..state import schema as s

__all__ = [
    "IndexVersion",
    "VersionState",
    "add_version",
    "checkpoint",
    "state_name",
    "swap",
    "versions",
]

VersionState = Literal["building", "live", "previous", "dropped"]
# tables whose rows belong to one version of a mapping (renamed at a swap)
_PER_VERSION = (s.record_state, s.record_deps, s.dead_letter)


@dataclass(frozen=True, slots=True, kw_only=True)
class IndexVersion:
    mapping: str
    version: int
    digest: str
    collection: str
    state: VersionState
    definition: Mapping[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    live_at: float | None = None
    retired_at: float | None = None
    dropped_at: float | None = None
    backfill_after: Key | None = None
    backfill_done: bool = False
    backfilled: int = 0

    @property
    def model(self) -> str:
        return str(self.definition.get("model", ""))

    @property
    def dimension(self) -> int:
        return int(self.definition.get("dimension", 0))


def state_name(mapping: str, version: IndexVersion) -> str:
    """Where a version's record state lives: the mapping's name while live."""
    return mapping if version.state == "live" else f"{mapping}@v{version.version}"


def _row(r: Any) -> IndexVersion:
    after = r.backfill_after
    return IndexVersion(
        mapping=r.mapping,
        version=int(r.version),
        digest=r.digest,
        collection=r.collection,
        state=r.state,
        definition=orjson.loads(r.definition),
        created_at=float(r.created_at),
        live_at=r.live_at,
        retired_at=r.retired_at,
        dropped_at=r.dropped_at,
        backfill_after=None if after is None else orjson.loads(after),
        backfill_done=bool(r.backfill_done),
        backfilled=int(r.backfilled or 0),
    )


def versions(conn: Connection, mapping: str | None = None) -> list[IndexVersion]:
    t = s.index_versions
    query = select(t).order_by(t.c.mapping, t.c.version)
    if mapping is not None:
        query = query.where(t.c.mapping == mapping)
    return [_row(r) for r in conn.execute(query)]


def add_version(
    conn: Connection,
    mapping: str,
    *,
    digest: str,
    collection: str,
    state: VersionState,
    definition: Mapping[str, Any],
    backfill_done: bool = False,
) -> IndexVersion:
    """A new version, numbered after the mapping's last one."""
    t = s.index_versions
    last = conn.scalar(
        select(t.c.version).where(t.c.mapping == mapping).order_by(t.c.version.desc())
    )
    number = 1 if last is None else int(last) + 1
    now = time.time()
    conn.execute(
        t.insert().values(
            mapping=mapping,
            version=number,
            digest=digest,
            collection=collection.replace("{n}", str(number)),
            state=state,
            definition=dumps(dict(definition)).decode(),
            created_at=now,
            live_at=now if state == "live" else None,
            backfill_done=int(backfill_done),
            backfilled=0,
        )
    )
    [found] = [v for v in versions(conn, mapping) if v.version == number]
    return found


def set_state(conn: Connection, mapping: str, version: int, state: VersionState) -> None:
    t = s.index_versions
    now = time.time()
    values: dict[str, Any] = {"state": state}
    if state == "live":
        values["live_at"] = now
    elif state == "previous":
        values["retired_at"] = now
    elif state == "dropped":
        values["dropped_at"] = now
    conn.execute(update(t).where(t.c.mapping == mapping, t.c.version == version).values(**values))


def set_collection(conn: Connection, mapping: str, version: int, collection: str) -> None:
    t = s.index_versions
    conn.execute(
        update(t)
        .where(t.c.mapping == mapping, t.c.version == version)
        .values(collection=collection)
    )


def checkpoint(
    conn: Connection, mapping: str, version: int, after: Key | None, count: int, done: bool
) -> None:
    """A backfill's progress, in the batch commit that wrote the page: a crash resumes
    after ``after``, never from the start."""
    t = s.index_versions
    conn.execute(
        update(t)
        .where(t.c.mapping == mapping, t.c.version == version)
        .values(
            backfill_after=None if after is None else dumps(after).decode(),
            backfilled=t.c.backfilled + count,
            backfill_done=int(done),
        )
    )


def restart_backfill(conn: Connection, mapping: str, version: int) -> None:
    """A version's backfill from the start again (after it did not verify)."""
    t = s.index_versions
    conn.execute(
        update(t)
        .where(t.c.mapping == mapping, t.c.version == version)
        .values(backfill_after=None, backfilled=0, backfill_done=0)
    )


def rename_state(conn: Connection, old: str, new: str) -> None:
    """Move a version's record state, dependencies and dead letters to another name."""
    for table in _PER_VERSION:
        conn.execute(update(table).where(table.c.mapping == old).values(mapping=new))


def swap(conn: Connection, mapping: str, live: IndexVersion, building: IndexVersion) -> None:
    """``building`` becomes live, ``live`` becomes previous: their states and version rows
    change in one transaction (the sink's alias follows right after)."""
    retired = f"{mapping}@v{live.version}"
    rename_state(conn, mapping, retired)
    rename_state(conn, f"{mapping}@v{building.version}", mapping)
    set_state(conn, mapping, live.version, "previous")
    set_state(conn, mapping, building.version, "live")


def forget_state(conn: Connection, name: str) -> None:
    """Drop every row of a version's state (after its collection was dropped)."""
    for table in _PER_VERSION:
        conn.execute(table.delete().where(table.c.mapping == name))
    conn.execute(s.mapping_counters.delete().where(s.mapping_counters.c.mapping == name))


def keys_in(conn: Connection, name: str, keys: Sequence[str]) -> dict[str, int]:
    """Key → row digest of ``name``'s record state (to compare two versions)."""
    t = s.record_state
    found: dict[str, int] = {}
    for i in range(0, len(keys), 500):
        rows = conn.execute(
            select(t.c.key, t.c.digest_hi, t.c.digest_lo).where(
                t.c.mapping == name, t.c.key.in_(list(keys[i : i + 500]))
            )
        )
        found.update((k, (hi << 31) | lo) for k, hi, lo in rows)
    return found
