"""Typed sync events for subscribers: ``async for event in engine.events(): ...``."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Captured",
    "Compensated",
    "DeadLettered",
    "Event",
    "Failed",
    "Inconsistent",
    "IndexSwapped",
    "ReindexProgress",
    "ReindexStarted",
    "RunFinished",
    "RunStarted",
    "SchemaEvolved",
    "Synced",
    "Written",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    at: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunStarted(Event):
    run_id: int
    mode: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Synced(Event):
    """A batch of one mapping is durable in its sink and in the state store."""

    mapping: str
    source: str
    position: int
    counts: dict[str, int]


@dataclass(frozen=True, slots=True, kw_only=True)
class Written(Event):
    """A write of the write API (``engine.writer``) went through: committed at the source
    (``eventual``) or in every sink too (``strong``; ``dead_lettered`` keys a sink refused,
    kept at the source under ``compensate="dead_letter"``)."""

    source: str
    table: str
    key: Any
    op: str
    consistency: str
    dead_lettered: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Compensated(Event):
    """A sink refused a written record for good, so the source row was restored from the
    journaled before-image (``compensate="undo"``)."""

    source: str
    table: str
    key: Any
    sinks: tuple[str, ...]
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Captured(Event):
    """A change read from a source. ``kind`` is ``entity`` (a row or node was created,
    updated or deleted) or ``relationship`` (an edge of type ``relation`` was created or
    deleted: one event for each of its two nodes); ``action`` is ``created``,
    ``updated``, ``deleted``, or ``snapshot`` / ``replay`` for keys vectorsync enqueued."""

    source: str
    table: str
    key: Any
    kind: str
    action: str
    relation: str | None = None
    position: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class SchemaEvolved(Event):
    """A mapping's definition got a new version in the schema registry (``evolution`` is
    ``create``, ``add_column``, ``drop_column``, ``type_change``, ``template_change``,
    ``model_change`` or ``payload_change``)."""

    mapping: str
    version: int
    evolution: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLettered(Event):
    mapping: str
    key: str
    error_type: str
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Failed(Event):
    """A run failed; ``error_type`` is the error log's classification."""

    run_id: int
    error_type: str
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RunFinished(Event):
    run_id: int
    status: str
    counts: dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class Inconsistent(Event):
    mapping: str
    check_id: int | None
    counts: dict[str, int]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReindexStarted(Event):
    """A mapping's next index version is being built beside the live one."""

    mapping: str
    version: int
    collection: str
    reason: str  # what changed: model, dimension, distance, text, or "asked"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReindexProgress(Event):
    mapping: str
    version: int
    done: int
    total: int | None
    rate: float  # records per second
    eta: float | None  # seconds


@dataclass(frozen=True, slots=True, kw_only=True)
class IndexSwapped(Event):
    """The mapping's collection name points at another version now (a swap or rollback)."""

    mapping: str
    version: int
    previous: int
    collection: str


class EventStream:
    """One subscription to an engine's events; registered when created."""

    def __init__(self, subscribers: set[asyncio.Queue[Event]], buffer: int) -> None:
        self._subscribers = subscribers
        self._queue: asyncio.Queue[Event] = asyncio.Queue(buffer)
        subscribers.add(self._queue)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        return await self._queue.get()

    def drain(self) -> list[Event]:
        """The events received so far, without waiting."""
        events = []
        while not self._queue.empty():
            events.append(self._queue.get_nowait())
        return events

    def close(self) -> None:
        self._subscribers.discard(self._queue)
