"""The bus on Redis Streams: one stream per (source, partition), the capture's position in
a hash beside them; every key of a source shares one hash tag, so a publish is one
MULTI/EXEC (also on a Redis Cluster).

Durability is the server's: run Redis with ``appendonly yes`` and ``appendfsync always``
so that a publish acknowledged is on disk (``vectorsync capture`` warns otherwise). A
partition's position is its entry id packed into an integer (``ms << 20 | seq``).

Consumer groups are not used: a partition belongs to one worker at a time (a lease in the
state store), and that worker's position in it is committed with the record states it
wrote, so an entry is applied exactly once in effect; a dead worker's partitions are taken
over from its last commit (what ``XAUTOCLAIM`` would give back, without the ambiguity of
an entry acknowledged but not committed, or committed but not acknowledged).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..errors import ConfigError, RetryableError
from ..model import Change
from ..redact import redact
from .base import decode, encode

__all__ = ["RedisBus", "entry_id", "entry_position"]

logger = logging.getLogger(__name__)

_SEQ_BITS = 20
_ENTRIES = 16  # entries per read (each holds one publish's changes of a partition)


def entry_position(entry: str | bytes) -> int:
    text = entry.decode() if isinstance(entry, bytes) else entry
    ms, _, seq = text.partition("-")
    if int(seq) >= 1 << _SEQ_BITS:
        raise RetryableError(f"stream entry {text}: sequence too large for a position")
    return (int(ms) << _SEQ_BITS) | int(seq)


def entry_id(position: int) -> str:
    return f"{position >> _SEQ_BITS}-{position & ((1 << _SEQ_BITS) - 1)}"


class RedisBus:
    def __init__(self, url: str, *, partitions: int) -> None:
        self.url = url
        self.partitions = partitions
        self._redis: Any = None

    def __repr__(self) -> str:
        return f"RedisBus({redact(self.url)!r}, partitions={self.partitions})"

    @staticmethod
    def _stream(source: str, partition: int) -> str:
        return f"vectorsync:{{{source}}}:p{partition}"

    @staticmethod
    def _captured(source: str) -> str:
        return f"vectorsync:{{{source}}}:captured"

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        import redis.exceptions as rx

        try:
            yield
        except (rx.ConnectionError, rx.TimeoutError, OSError) as exc:
            raise RetryableError(
                f"bus {redact(self.url)}: cannot {what} ({exc}); is the Redis server up? "
                "vectorsync retries"
            ) from exc
        except rx.ResponseError as exc:
            raise RetryableError(f"bus {redact(self.url)}: {what}: {exc}") from exc

    async def open(self) -> None:
        try:
            import redis.asyncio as aredis
        except ImportError:
            raise ConfigError(
                "the [bus] needs the bus extra: pip install 'vectorsync[bus]'"
            ) from None

        self._redis = aredis.from_url(self.url)
        with self._errors("connect"):
            info = await self._redis.info("persistence")
        if str(info.get("aof_enabled")) != "1":
            logger.warning(
                "bus %s keeps no append-only file: a Redis restart loses what it holds; "
                "run it with appendonly yes and appendfsync always",
                redact(self.url),
                extra={"action": "bus_not_durable"},
            )

    async def close(self) -> None:
        redis, self._redis = self._redis, None
        if redis is not None:
            with contextlib.suppress(Exception):
                await redis.aclose()

    @property
    def _r(self) -> Any:
        if self._redis is None:
            raise RuntimeError("bus is not open")
        return self._redis

    async def captured(self, source: str) -> tuple[str, int]:
        with self._errors("read the capture position"):
            found = await self._r.hgetall(self._captured(source))
        if not found:
            return "", 0
        return found[b"epoch"].decode(), int(found[b"position"])

    async def publish(
        self, source: str, epoch: str, position: int, parts: Mapping[int, Sequence[Change]]
    ) -> None:
        pipe = self._entries(source, parts)
        pipe.hset(self._captured(source), mapping={"epoch": epoch, "position": position})
        with self._errors("publish changes"):
            await pipe.execute()

    async def forward(self, source: str, parts: Mapping[int, Sequence[Change]]) -> None:
        pipe = self._entries(source, parts)
        with self._errors("hand changes to their partitions"):
            await pipe.execute()

    def _entries(self, source: str, parts: Mapping[int, Sequence[Change]]) -> Any:
        """A transaction appending one entry per partition."""
        pipe = self._r.pipeline(transaction=True)
        for partition, changes in sorted(parts.items()):
            pipe.xadd(self._stream(source, partition), {"c": encode(changes)})
        return pipe

    async def read(self, source: str, partition: int, after: int, limit: int) -> list[Change]:
        key = self._stream(source, partition)
        with self._errors(f"read partition {partition}"):
            entries = await self._r.xrange(key, min=f"({entry_id(after)}", count=_ENTRIES)
        out: list[Change] = []
        for eid, fields in entries:
            out.extend(decode(fields[b"c"], entry_position(eid)))
            if len(out) >= limit:
                break
        return out

    async def head(self, source: str, partition: int) -> int:
        with self._errors(f"read partition {partition}"):
            last = await self._r.xrevrange(self._stream(source, partition), count=1)
        return entry_position(last[0][0]) if last else 0

    async def wait(self, source: str, partition: int, after: int, timeout: float) -> None:
        key = self._stream(source, partition)
        with self._errors(f"wait on partition {partition}"):
            await self._r.xread({key: entry_id(after)}, count=1, block=max(1, int(timeout * 1000)))

    async def trim(self, source: str, partition: int, upto: int) -> None:
        with self._errors(f"trim partition {partition}"):
            await self._r.xtrim(self._stream(source, partition), minid=entry_id(upto + 1))

    async def depth(self, source: str, partition: int, after: int = 0) -> int:  # trimmed at ack
        with self._errors(f"read partition {partition}"):
            return int(await self._r.xlen(self._stream(source, partition)))
