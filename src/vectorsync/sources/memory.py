"""An in-memory source: tables of rows plus an outbox, for users' tests and ours.

It keeps the same contract as the SQLite source (tests/contract runs one suite on both).
``emit`` injects raw changes, e.g. duplicated or out-of-order ones.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from ..errors import ConfigError
from ..model import Change, Key, Op
from ..related import RelatedRecord, Relation
from .base import Backlog, TableSpec

__all__ = ["MemorySource"]


class MemorySource:
    def __init__(
        self, name: str = "memory", tables: dict[str, dict[str, str]] | None = None
    ) -> None:
        self.name = name
        self._schemas: dict[str, dict[str, str]] = dict(tables or {})
        self._rows: dict[str, dict[Key, dict[str, Any]]] = {t: {} for t in self._schemas}
        self._keys: dict[str, str] = {}
        self._outbox: list[Change] = []
        self._seq = 0
        self._epoch = ""

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def create_table(self, table: str, columns: dict[str, str]) -> None:
        self._schemas[table] = dict(columns)
        self._rows.setdefault(table, {})

    def rows(self, table: str) -> dict[Key, dict[str, Any]]:
        return {k: dict(v) for k, v in self._rows[table].items()}

    # -- writes, as an application would make them --------------------------------------
    def upsert(self, table: str, row: dict[str, Any]) -> None:
        key = row[self._key_column(table)]
        op: Op = "update" if key in self._rows[table] else "insert"
        self._rows[table][key] = dict(row)
        self._capture(table, key, op)

    def delete(self, table: str, key: Key) -> None:
        if self._rows[table].pop(key, None) is not None:
            self._capture(table, key, "delete")

    def emit(self, changes: Iterable[Change]) -> None:
        """Append raw changes (positions are reassigned in the given order)."""
        for c in changes:
            self._capture(c.table, c.key, c.op)

    def _key_column(self, table: str) -> str:
        return self._keys.get(table, "id")

    def _capture(self, table: str, key: Key, op: Op) -> None:
        if table not in self._keys:
            return  # no capture installed yet: setup() snapshots what exists
        self._seq += 1
        self._outbox.append(
            Change(table=table, key=key, op=op, position=self._seq, committed_at=time.time())
        )

    # -- the Source port ----------------------------------------------------------------
    async def columns(self, table: str) -> dict[str, str]:
        if table not in self._schemas:
            known = ", ".join(sorted(self._schemas)) or "none"
            raise ConfigError(f"source {self.name!r}: table {table!r} not found (tables: {known})")
        return dict(self._schemas[table])

    async def check_key(self, spec: TableSpec) -> None:
        return None  # rows are kept by key: one row per key by construction

    async def setup(self, tables: Sequence[TableSpec]) -> list[str]:
        new = [s for s in tables if self._keys.get(s.table) != s.key]
        if new and not self._keys:  # installed anew: its positions restart
            self._epoch = ""
            self._seq = 0
        for spec in new:
            self._keys[spec.table] = spec.key
            await self.resnapshot(spec)
        return [s.table for s in new]

    async def teardown(self) -> None:
        self._keys.clear()
        self._outbox.clear()
        self._epoch = ""

    async def epoch(self) -> str:
        if self._keys and not self._epoch:
            self._epoch = uuid.uuid4().hex
        return self._epoch if self._keys else ""

    async def resnapshot(self, spec: TableSpec) -> None:
        for key in list(self._rows[spec.table]):
            self._capture(spec.table, key, "snapshot")

    async def enqueue(self, table: str, keys: Sequence[Key]) -> None:
        for key in keys:
            self._capture(table, key, "replay")

    async def head(self) -> int:
        return self._seq

    async def read_changes(self, after: int, limit: int) -> list[Change]:
        return [c for c in self._outbox if c.position > after][:limit]

    async def wait(self, timeout: float) -> None:
        await asyncio.sleep(timeout)  # polled: no change notification

    async def fetch(self, table: str, key: str, keys: Sequence[Key]) -> dict[Key, dict[str, Any]]:
        rows = self._rows[table]
        return {k: dict(rows[k]) for k in keys if k in rows}

    async def scan(
        self, table: str, key: str, *, page: int = 5000, after: Key | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        for k in sorted(self._rows[table], key=_order):
            if after is None or _order(k) > _order(after):
                yield dict(self._rows[table][k])

    async def related(
        self, owner: TableSpec, rel: Relation, keys: Sequence[Key]
    ) -> dict[Key, list[RelatedRecord]]:
        assert rel.on is not None
        rc, oc = rel.on
        owners, related = self._rows[owner.table], self._rows[rel.table].values()
        found: dict[Key, list[RelatedRecord]] = {}
        for key in (k for k in keys if k in owners):
            value = owners[key].get(oc)
            for r in related:
                if value is not None and r.get(rc) == value:
                    fields = {out: r.get(column) for out, column in rel.fields}
                    found.setdefault(key, []).append((r[rel.key], fields))
        return found

    async def dependents(
        self, owner: TableSpec, rel: Relation, related_keys: Sequence[Key]
    ) -> list[Key]:
        assert rel.on is not None
        rc, oc = rel.on
        values: set[Any] = set(related_keys)
        if rc != rel.key:
            rows = self._rows[rel.table]
            values = {rows[k].get(rc) for k in related_keys if k in rows}
        return [k for k, row in self._rows[owner.table].items() if row.get(oc) in values]

    async def ack(self, position: int) -> None:
        self._outbox = [c for c in self._outbox if c.position > position]

    async def backlog(self, after: int) -> Backlog:
        pending = [c for c in self._outbox if c.position > after]
        oldest = min((c.committed_at for c in pending), default=None)
        return Backlog(changes=len(pending), oldest_committed_at=oldest)


def _order(key: Key) -> tuple[str, Key]:
    """Keys in order, integers apart from texts (as a database orders one typed column)."""
    return (str(type(key)), key)
