"""The guarantee suite in scale-out mode: every change goes through the bus — Redis
Streams, or the Kafka protocol on a Tansu broker (real servers the tests start) — captured,
partitioned by key and applied per partition, on every source kind (``sync_once`` runs
``capture --once`` then ``worker --once``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import App
from tests.integration.test_guarantees import (
    duplicated_and_shuffled_converge,
    random_changes_converge,
)
from tests.integration.test_guarantees import (
    test_minimal_embedding as minimal_embedding,  # not collected here a second time
)
from tests.integration.test_guarantees import (
    test_reverted_text_comes_from_the_embedding_cache as reverted_text_from_the_cache,
)
from tests.kafka_server import kafka_server
from tests.redis_server import RedisServer, redis_server

pytestmark = [pytest.mark.all_sources]


@pytest.fixture(scope="module")
def redis_bus() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture(params=["redis", "kafka"], autouse=True)
def on_the_bus(request: pytest.FixtureRequest, workdir: Path) -> Iterator[None]:
    """Redis Streams (one server, emptied per test) or the Kafka protocol (a broker per
    test: topics cannot be emptied)."""
    if request.param == "kafka":
        with kafka_server() as broker:
            (workdir / "bus.toml").write_text(
                f'kind = "kafka"\nurl = "{broker.url}"\npartitions = 4\nheartbeat = 0.2'
            )
            yield
        return
    import redis

    server: RedisServer = request.getfixturevalue("redis_bus")
    client = redis.Redis.from_url(server.url)
    client.flushdb()  # each test on an empty bus
    (workdir / "bus.toml").write_text(f'url = "{server.url}"\npartitions = 4\nheartbeat = 0.2')
    yield
    # the changes went through the bus: the capture's position is there
    assert client.hget("vectorsync:{app}:captured", "position") not in (None, b"0")


async def test_random_changes_converge_through_the_bus(workdir: Path, app: App) -> None:
    await random_changes_converge(workdir, app, seed=5)


async def test_minimal_embedding_through_the_bus(workdir: Path, app: App) -> None:
    await minimal_embedding(workdir, app)


async def test_the_embedding_cache_through_the_bus(workdir: Path, app: App) -> None:
    await reverted_text_from_the_cache(workdir, app)


async def test_duplicated_and_shuffled_changes_through_the_bus(workdir: Path, app: App) -> None:
    await duplicated_and_shuffled_converge(workdir, app)
