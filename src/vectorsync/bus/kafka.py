"""The bus on the Kafka protocol (``aiokafka``): a topic per source
(``vectorsync.<source>``) with one Kafka partition per bus partition, and a one-partition
topic ``vectorsync.<source>.captured`` holding the capture's (epoch, position) records.

A partition's position is its Kafka offset + 1 (0: nothing). Publishing waits for the
broker's acknowledgement (``acks="all"``) of every entry, then of the capture's position:
not one transaction, so a capture killed between the two publishes again from its last
recorded position — entries twice on the bus, which the level-triggered apply makes
harmless (nothing is lost). Entries are kept by the topic's retention (the bus does not
delete records: not every Kafka-protocol broker supports it); a worker's applied position
lives in the state store, so ``depth`` counts the entries after it.

A partition's end is the high watermark of a fetch answered after the call, not a
ListOffsets answer: Tansu 0.6 answers ListOffsets with the base offset + 1 of the batch it
stored last by modification time (to the second on S3), so a burst of entries within one
second reads as its first. A read first reads the end, then waits for the records it
knows are there. Readers fetch only while a call reads (paused otherwise): an idle bus
sends the broker no fetches.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import orjson

from ..errors import ConfigError, RetryableError
from ..model import Change
from ..redact import redact
from .base import decode, encode

__all__ = ["KafkaBus"]

# Tansu on S3 answers a fetch with the batches it read within the fetch's max wait, and
# one stored batch takes it tens of ms (a listing of the partition's objects, then a GET):
# records come through a patient reader, the end (any answer carries it) a quick one.
_QUICK_MS = 5
_PATIENT_MS = 500


class KafkaBus:
    def __init__(self, url: str, *, partitions: int) -> None:
        self.url = url
        self.partitions = partitions
        self._servers = url.removeprefix("kafka://")
        self._producer: Any = None
        self._admin: Any = None
        self._readers: dict[tuple[str, int, int], Any] = {}
        self._topics: set[str] = set()
        # a consumer's position is shared by its callers: one seek-and-fetch at a time
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._ends: dict[tuple[str, int], int] = {}  # the last high watermarks seen
        self._next: dict[tuple[str, int], int] = {}  # where the patient readers are
        self.fetch_timeout = 10.0  # seconds for a fetch answer (the broker is away past it)

    def __repr__(self) -> str:
        return f"KafkaBus({redact(self.url)!r}, partitions={self.partitions})"

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        from aiokafka.errors import KafkaError

        try:
            yield
        except (TimeoutError, KafkaError, OSError) as exc:
            raise RetryableError(
                f"bus {redact(self.url)}: cannot {what} ({type(exc).__name__}: {exc}); is the "
                "broker up? vectorsync retries"
            ) from exc

    async def open(self) -> None:
        try:
            from aiokafka import AIOKafkaProducer
            from aiokafka.admin import AIOKafkaAdminClient
        except ImportError:
            raise ConfigError(
                "a kafka [bus] needs the kafka extra: pip install 'vectorsync[kafka]'"
            ) from None
        with self._errors("connect"):
            self._admin = AIOKafkaAdminClient(bootstrap_servers=self._servers)
            await self._admin.start()
            self._producer = AIOKafkaProducer(bootstrap_servers=self._servers, acks="all")
            await self._producer.start()

    async def close(self) -> None:
        for client in [*self._readers.values(), self._producer]:
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()
        self._readers.clear()
        self._producer = None
        if self._admin is not None:
            with contextlib.suppress(Exception):
                await self._admin.close()
            self._admin = None

    @staticmethod
    def _topic(source: str) -> str:
        return f"vectorsync.{source}"

    async def _ensure(self, source: str) -> None:
        """The source's topics, created with the configured partitions if missing."""
        if source in self._topics:
            return
        from aiokafka.admin import NewTopic
        from aiokafka.errors import TopicAlreadyExistsError

        topics = [
            NewTopic(self._topic(source), num_partitions=self.partitions, replication_factor=1),
            NewTopic(self._topic(source) + ".captured", num_partitions=1, replication_factor=1),
        ]
        with self._errors("create the bus topics"):
            for topic in topics:
                with contextlib.suppress(TopicAlreadyExistsError):
                    await self._admin.create_topics([topic])
        self._topics.add(source)

    async def _reader(self, topic: str, partition: int, wait_ms: int) -> Any:
        """A consumer assigned to one partition (no group: positions are ours), paused
        between calls; ``wait_ms``: how long the broker may gather records for a fetch."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        found = self._readers.get((topic, partition, wait_ms))
        if found is None:
            found = AIOKafkaConsumer(
                bootstrap_servers=self._servers,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                fetch_max_wait_ms=wait_ms,
            )
            await found.start()
            tp = TopicPartition(topic, partition)
            found.assign([tp])
            found.pause(tp)
            self._readers[(topic, partition, wait_ms)] = found
        return found

    def _lock(self, topic: str, partition: int) -> asyncio.Lock:
        return self._locks.setdefault((topic, partition), asyncio.Lock())

    async def _end(self, topic: str, partition: int) -> int:
        """The partition's high watermark, as two fetch answers after the call tell (the
        first may answer a fetch sent before it), from the last one seen (small answers)."""
        from aiokafka import TopicPartition
        from aiokafka.errors import KafkaTimeoutError

        tp = TopicPartition(topic, partition)
        reader = await self._reader(topic, partition, _QUICK_MS)
        async with self._lock(topic, partition):
            offset = self._ends.get((topic, partition), 0)
            reader.seek(tp, offset)
            reader.resume(tp)
            try:
                seen, answers = reader.last_poll_timestamp(tp), 0
                end = time.monotonic() + self.fetch_timeout
                while answers < 2:
                    if (await reader.getmany(tp, timeout_ms=0)).get(tp):  # not wanted:
                        reader.seek(tp, max(offset, int(reader.highwater(tp))))  # to the end
                    if time.monotonic() > end:
                        raise KafkaTimeoutError(f"no fetch answer for {tp} in time")
                    await asyncio.sleep(0.002)  # aiokafka signals no answer without records
                    if reader.last_poll_timestamp(tp) != seen:
                        seen, answers = reader.last_poll_timestamp(tp), answers + 1
            finally:
                reader.pause(tp)
            self._ends[(topic, partition)] = high = int(reader.highwater(tp))
            return high

    async def _records(self, topic: str, partition: int, offset: int) -> list[Any]:
        """The records from ``offset`` on (the caller saw the end past it), up to 16."""
        from aiokafka import TopicPartition
        from aiokafka.errors import KafkaTimeoutError

        tp = TopicPartition(topic, partition)
        reader = await self._reader(topic, partition, _PATIENT_MS)
        async with self._lock(topic, partition):
            if self._next.get((topic, partition)) != offset:  # else: what it fetched on
                reader.seek(tp, offset)
            reader.resume(tp)
            try:
                end = time.monotonic() + self.fetch_timeout
                while (left := end - time.monotonic()) > 0:
                    got = await reader.getmany(tp, timeout_ms=int(left * 1000), max_records=16)
                    found = [r for r in got.get(tp, []) if r.offset >= offset]  # not a reset's
                    if found:
                        self._next[(topic, partition)] = found[-1].offset + 1
                        return found
            finally:
                reader.pause(tp)
        raise KafkaTimeoutError(f"no records of {tp} from offset {offset} in time")

    async def captured(self, source: str) -> tuple[str, int]:
        await self._ensure(source)
        topic = self._topic(source) + ".captured"
        with self._errors("read the capture position"):
            end = await self._end(topic, 0)
            if end == 0:
                return "", 0
            records = await self._records(topic, 0, end - 1)
        epoch, position = orjson.loads(records[-1].value)
        return str(epoch), int(position)

    async def publish(
        self, source: str, epoch: str, position: int, parts: Mapping[int, Sequence[Change]]
    ) -> None:
        await self.forward(source, parts)
        with self._errors("record the capture position"):
            await self._producer.send_and_wait(
                self._topic(source) + ".captured", orjson.dumps([epoch, position]), partition=0
            )

    async def forward(self, source: str, parts: Mapping[int, Sequence[Change]]) -> None:
        await self._ensure(source)
        with self._errors("publish changes"):
            sent = [
                await self._producer.send(
                    self._topic(source),
                    encode(cs),
                    partition=p,
                )
                for p, cs in sorted(parts.items())
            ]
            await asyncio.gather(*sent)  # every entry acknowledged by the broker

    async def read(self, source: str, partition: int, after: int, limit: int) -> list[Change]:
        await self._ensure(source)
        topic = self._topic(source)
        with self._errors(f"read partition {partition}"):
            if await self._end(topic, partition) <= after:
                return []
            # position after = offset after - 1 applied
            records = await self._records(topic, partition, after)
        out: list[Change] = []
        for record in records:
            out.extend(decode(record.value, record.offset + 1))
            if len(out) >= limit:
                break
        return out

    async def head(self, source: str, partition: int) -> int:
        await self._ensure(source)
        with self._errors(f"read partition {partition}"):
            return await self._end(self._topic(source), partition)

    async def wait(self, source: str, partition: int, after: int, timeout: float) -> None:
        # polled: a fetch that returns nothing waits the same
        if await self.head(source, partition) <= after:
            await asyncio.sleep(timeout)

    async def trim(self, source: str, partition: int, upto: int) -> None:
        return None  # the topic's retention drops old entries

    async def depth(self, source: str, partition: int, after: int = 0) -> int:
        return max(0, await self.head(source, partition) - after)
