"""The source port: change capture plus level-triggered re-reads."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..model import Change, Key
from ..related import RelatedRecord, Relation

__all__ = ["Backlog", "Source", "TableSpec", "WritesBack"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TableSpec:
    table: str
    key: str
    edge: bool = False  # a graph edge table a relation goes through (SurrealDB)


@dataclass(frozen=True, slots=True, kw_only=True)
class Backlog:
    """Changes committed after a position and not yet applied."""

    changes: int
    oldest_committed_at: float | None
    lag_bytes: int | None = None  # how much log the source keeps for us (replication slots)


@runtime_checkable
class WritesBack(Protocol):
    """A source whose rows vectorsync may update (conflicts' write_back: SQL sources)."""

    async def write_back(self, spec: TableSpec, key: Key, values: Mapping[str, Any]) -> None:
        """Set ``values`` (column → value) on the row keyed ``key``."""
        ...


class Source(Protocol):
    """A database that owns the truth.

    Positions are integers, totally ordered per source. ``read_changes`` returns changes
    with ``position > after`` in position order; ``fetch`` re-reads current rows (a missing
    key means the row is gone). ``ack`` tells the source that everything up to
    ``position`` is durably applied, so it may release it.
    """

    name: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def columns(self, table: str) -> dict[str, str]:
        """Column name → declared type; ConfigError if the table does not exist."""
        ...

    async def check_key(self, spec: TableSpec) -> None:
        """ConfigError unless ``spec.key`` identifies one row of its table (a primary key or
        a unique index on it, of a type that keeps 42 and '42' apart), naming the fix."""
        ...

    async def setup(self, tables: Sequence[TableSpec]) -> list[str]:
        """Install change capture idempotently; returns the tables snapshotted now (new ones)."""
        ...

    async def teardown(self) -> None:
        """Remove what ``setup`` installed; a later ``setup`` snapshots again."""
        ...

    async def epoch(self) -> str:
        """The identity of the installed change capture: a new value every time capture is
        installed anew (a ``setup`` after ``teardown``, or after its outbox was dropped), so
        a position stored under another epoch is not a position of this feed. ``""`` while
        no capture is installed. Sources whose positions never restart (a log sequence
        number, a timestamp) may return a constant."""
        ...

    async def resnapshot(self, spec: TableSpec) -> None:
        """Enqueue every existing key of a table as a change (after its mapping changed)."""
        ...

    async def enqueue(self, table: str, keys: Sequence[Key]) -> None:
        """Enqueue keys as changes (a dead-letter replay goes through the normal path)."""
        ...

    async def head(self) -> int:
        """The newest committed position."""
        ...

    async def read_changes(self, after: int, limit: int) -> list[Change]: ...

    async def wait(self, timeout: float) -> None:
        """Return when new changes may have arrived, or after ``timeout`` seconds."""
        ...

    async def fetch(
        self, table: str, key: str, keys: Sequence[Key]
    ) -> dict[Key, dict[str, Any]]: ...

    def scan(
        self, table: str, key: str, *, page: int = 5000, after: Key | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Every current row of a table (with a key above ``after``), in key order, a page
        at a time."""
        ...

    async def related(
        self, owner: TableSpec, rel: Relation, keys: Sequence[Key]
    ) -> dict[Key, list[RelatedRecord]]:
        """Per owner key, the records related to it now: (related key, field → value)."""
        ...

    async def dependents(
        self, owner: TableSpec, rel: Relation, related_keys: Sequence[Key]
    ) -> list[Key]:
        """Owner keys related now to any of ``related_keys`` (the relation, reversed)."""
        ...

    async def ack(self, position: int) -> None: ...

    async def backlog(self, after: int) -> Backlog: ...
