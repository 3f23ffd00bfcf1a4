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
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import orjson

from ..errors import ConfigError, RetryableError
from ..model import Change
from ..redact import redact
from .base import decode, encode

__all__ = ["KafkaBus"]


class KafkaBus:
    def __init__(self, url: str, *, partitions: int) -> None:
        self.url = url
        self.partitions = partitions
        self._servers = url.removeprefix("kafka://")
        self._producer: Any = None
        self._admin: Any = None
        self._readers: dict[tuple[str, int], Any] = {}
        self._topics: set[str] = set()
        # a consumer's position is shared by its callers: one seek-and-fetch at a time
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}

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

    async def _reader(self, topic: str, partition: int) -> Any:
        """A consumer assigned to one partition (no group: positions are ours)."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        found = self._readers.get((topic, partition))
        if found is None:
            found = AIOKafkaConsumer(
                bootstrap_servers=self._servers,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                fetch_max_wait_ms=20,  # a read answers at once (wait() does the waiting)
            )
            await found.start()
            found.assign([TopicPartition(topic, partition)])
            self._readers[(topic, partition)] = found
        return found

    def _lock(self, topic: str, partition: int) -> asyncio.Lock:
        return self._locks.setdefault((topic, partition), asyncio.Lock())

    async def _end(self, topic: str, partition: int) -> int:
        from aiokafka import TopicPartition

        tp = TopicPartition(topic, partition)
        reader = await self._reader(topic, partition)
        return int((await reader.end_offsets([tp]))[tp])

    async def captured(self, source: str) -> tuple[str, int]:
        from aiokafka import TopicPartition

        await self._ensure(source)
        topic = self._topic(source) + ".captured"
        with self._errors("read the capture position"):
            end = await self._end(topic, 0)
            if end == 0:
                return "", 0
            reader = await self._reader(topic, 0)
            tp = TopicPartition(topic, 0)
            async with self._lock(topic, 0):
                reader.seek(tp, end - 1)
                got = await reader.getmany(tp, timeout_ms=5000)
        records = got.get(tp, [])
        if not records:
            raise RetryableError(f"bus {redact(self.url)}: the capture position did not arrive")
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
        from aiokafka import TopicPartition

        await self._ensure(source)
        topic = self._topic(source)
        tp = TopicPartition(topic, partition)
        with self._errors(f"read partition {partition}"):
            if await self._end(topic, partition) <= after:
                return []
            reader = await self._reader(topic, partition)
            async with self._lock(topic, partition):
                reader.seek(tp, after)  # position after = offset after - 1 applied
                got = await reader.getmany(tp, timeout_ms=5000, max_records=16)
        out: list[Change] = []
        for record in got.get(tp, []):
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
