"""The bus port: a durable, partitioned log of change keys per source.

A change goes to the partition of its key's hash, so one key's changes stay in order in
one partition, and one worker (the partition's lease holder) applies them. A partition's
entries are numbered by increasing integer positions; a worker's position in a partition
is committed in the state store with the record states it wrote (exactly-once effect: a
worker that dies re-reads from its last commit, which the level-triggered apply makes
harmless). The capture's own position is stored in the bus atomically with the entries it
publishes, so a capture that restarts neither skips nor repeats a change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import orjson
import xxhash

from ..model import Change, Key

__all__ = ["Bus", "decode", "encode", "partition_of"]


def partition_of(key: Key, partitions: int) -> int:
    """The partition of a key (every process computes the same)."""
    return xxhash.xxh3_64_intdigest(str(key).encode()) % partitions


def encode(changes: Sequence[Change]) -> bytes:
    """One bus entry: the changes of one publish for one partition."""
    return orjson.dumps(
        [[c.table, c.key, c.op, c.position, c.committed_at, c.relation] for c in changes]
    )


def decode(entry: bytes, position: int) -> list[Change]:
    """An entry's changes, each at the entry's ``position`` in its partition."""
    return [
        Change(
            table=table,
            key=key,
            op=op,
            position=position,
            committed_at=committed_at,
            relation=relation,
        )
        for table, key, op, _, committed_at, relation in orjson.loads(entry)
    ]


class Bus(Protocol):
    partitions: int

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def captured(self, source: str) -> tuple[str, int]:
        """(epoch, position) of the source's capture as last published (("", 0): none)."""
        ...

    async def publish(
        self, source: str, epoch: str, position: int, parts: Mapping[int, Sequence[Change]]
    ) -> None:
        """Append each partition's changes and record (epoch, position) as captured, all
        or nothing; durable when it returns."""
        ...

    async def forward(self, source: str, parts: Mapping[int, Sequence[Change]]) -> None:
        """Append changes to partitions without moving the capture's position (a worker
        hands over fanned-out keys of other partitions); durable when it returns."""
        ...

    async def read(self, source: str, partition: int, after: int, limit: int) -> list[Change]:
        """Changes after ``after`` in the partition, whole entries (about ``limit``), each
        change's ``position`` the position of its entry."""
        ...

    async def head(self, source: str, partition: int) -> int:
        """The position of the partition's newest entry (0: none)."""
        ...

    async def wait(self, source: str, partition: int, after: int, timeout: float) -> None:
        """Return when an entry after ``after`` arrives, or after ``timeout`` seconds."""
        ...

    async def trim(self, source: str, partition: int, upto: int) -> None:
        """Drop the entries at or before ``upto`` (applied and committed)."""
        ...

    async def depth(self, source: str, partition: int, after: int = 0) -> int:
        """Entries of the partition not yet applied: after ``after``, the partition's
        applied position (a bus that trims at each ack may count what it holds)."""
        ...
