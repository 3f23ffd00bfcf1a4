"""The guarantee suite in scale-out mode: every change goes through the bus (Redis Streams,
a real server the test starts) — captured, partitioned by key, applied per partition — on
every source kind (``sync_once`` runs ``capture --once`` then ``worker --once``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import App
from tests.integration.test_guarantees import (
    duplicated_and_shuffled_converge,
    random_changes_converge,
    test_minimal_embedding,
    test_reverted_text_comes_from_the_embedding_cache,
)
from tests.redis_server import RedisServer, redis_server

pytestmark = [pytest.mark.all_sources]


@pytest.fixture(scope="module")
def bus() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture(autouse=True)
def on_the_bus(workdir: Path, bus: RedisServer) -> Iterator[None]:
    import redis

    client = redis.Redis.from_url(bus.url)
    client.flushdb()  # each test on an empty bus
    (workdir / "bus.toml").write_text(f'url = "{bus.url}"\npartitions = 4\nheartbeat = 0.2')
    yield
    # the changes went through the bus: the capture's position is there
    assert client.hget("vectorsync:{app}:captured", "position") not in (None, b"0")


async def test_random_changes_converge_through_the_bus(workdir: Path, app: App) -> None:
    await random_changes_converge(workdir, app, seed=5)


async def test_minimal_embedding_through_the_bus(workdir: Path, app: App) -> None:
    await test_minimal_embedding(workdir, app)


async def test_the_embedding_cache_through_the_bus(workdir: Path, app: App) -> None:
    await test_reverted_text_comes_from_the_embedding_cache(workdir, app)


async def test_duplicated_and_shuffled_changes_through_the_bus(workdir: Path, app: App) -> None:
    await duplicated_and_shuffled_converge(workdir, app)
