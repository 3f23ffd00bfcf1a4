"""Versioned schema migrations of the state store.

``STEPS[n]`` brings a store at version ``n`` to ``n + 1``; a fresh store is created at the
current version directly. The version lives in ``vs_meta`` and moves in the same
transaction as each step, so an interrupted upgrade resumes at the step that failed.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Connection, inspect, select, text

from ..errors import PermanentError
from . import schema as s

__all__ = ["STEPS", "migrate"]


def _chunks(conn: Connection) -> None:
    """2: record state keeps a chunked record's points (chunking)."""
    conn.execute(text("ALTER TABLE record_state ADD COLUMN chunks TEXT"))
    conn.execute(text("ALTER TABLE record_state ADD COLUMN points INTEGER NOT NULL DEFAULT 1"))


def _billing(conn: Connection) -> None:
    """3: runs count the tokens API embedders billed, and their cost."""
    conn.execute(text("ALTER TABLE sync_runs ADD COLUMN tokens BIGINT NOT NULL DEFAULT 0"))
    conn.execute(text("ALTER TABLE sync_runs ADD COLUMN cost FLOAT"))


# version -> the step that upgrades a store from it (version 1 is the baseline)
STEPS: dict[int, Callable[[Connection], None]] = {1: _chunks, 2: _billing}


def stored_version(conn: Connection) -> int | None:
    if not inspect(conn).has_table(s.meta.name):
        return None
    value = conn.scalar(select(s.meta.c.value).where(s.meta.c.name == "schema_version"))
    return None if value is None else int(value)


def _set_version(conn: Connection, version: int) -> None:
    conn.execute(s.meta.delete().where(s.meta.c.name == "schema_version"))
    conn.execute(s.meta.insert().values(name="schema_version", value=str(version)))


def migrate(conn: Connection, target: int = s.SCHEMA_VERSION) -> list[int]:
    """Create or upgrade the schema inside ``conn``'s transaction; the versions applied."""
    current = stored_version(conn)
    if current is None:
        s.metadata.create_all(conn)
        _set_version(conn, target)
        return [target]
    if current > target:
        raise PermanentError(
            f"state store schema is at version {current}, newer than this vectorsync "
            f"understands ({target}); upgrade vectorsync or point [state] url elsewhere"
        )
    applied = []
    for version in range(current, target):
        STEPS[version](conn)
        _set_version(conn, version + 1)
        applied.append(version + 1)
    s.metadata.create_all(conn)  # tables added without a data migration
    return applied
