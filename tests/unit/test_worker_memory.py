"""The worker on in-memory adapters: outages, rejected texts, duplicate/out-of-order events."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.helpers import RejectingSink
from vectorsync import parse_config
from vectorsync.backoff import Backoff
from vectorsync.embed.hash import HashEmbedder
from vectorsync.engine import Engine
from vectorsync.errors import EmbeddingError
from vectorsync.model import Change, point_id
from vectorsync.sinks.memory import MemorySink
from vectorsync.sources.memory import MemorySource
from vectorsync.state.store import StateStore

CONFIG = parse_config(
    {
        "state": {"url": "sqlite://"},
        "sources": {"app": {"kind": "sqlite", "path": "unused.db"}},
        "sinks": {"vectors": {"kind": "qdrant-edge"}},
        "embedders": {"default": {"kind": "hash"}},
        "mappings": [
            {
                "name": "docs",
                "source": "app",
                "table": "docs",
                "text": "{{ body }}",
                "payload": ["tag"],
                "sink": "vectors",
            }
        ],
    }
)
COLUMNS = {"id": "INTEGER", "body": "TEXT", "tag": "TEXT"}
FAST = Backoff(initial=0.01, maximum=0.05, deadline=30)


def make_source() -> MemorySource:
    return MemorySource("app", {"docs": COLUMNS})


async def sync(
    source: MemorySource, sink: MemorySink, embedder: Any = None, state: StateStore | None = None
) -> dict[str, int]:
    async with Engine.open(
        CONFIG,
        sources={"app": source},
        sinks={"vectors": sink},
        embedders={"default": embedder or HashEmbedder("default")},
        state=state or StateStore("sqlite://"),
        backoff=FAST,
    ) as engine:
        result = await engine.run(once=True)
    return result.counts


def snapshot(sink: MemorySink) -> dict[str, Any]:
    """Vectors and payloads, without the source position (it numbers deliveries)."""
    return {
        pid: (
            tuple(round(x, 6) for x in v),
            sorted((k, val) for k, val in p.items() if k != "_vs_version"),
        )
        for pid, (v, p) in sink.points_in("docs").items()
    }


async def test_duplicated_and_shuffled_events_converge_like_the_original() -> None:
    rng = random.Random(3)
    source = make_source()
    await source.setup([])
    history: list[Change] = []
    for step in range(300):
        key = rng.randint(1, 40)
        if rng.random() < 0.2:
            source.delete("docs", key)
        else:
            source.upsert(
                "docs", {"id": key, "body": f"text {rng.randint(0, 5)}", "tag": rng.choice("xyz")}
            )
        history.append(Change(table="docs", key=key, op="update", position=step))
    direct = MemorySink()
    await sync(source, direct)
    # the same final rows; every event delivered twice, shuffled
    replayed = make_source()
    replayed._rows = source._rows
    replayed._keys = {"docs": "id"}
    events = history * 2
    rng.shuffle(events)
    replayed.emit(events)
    again = MemorySink()
    await sync(replayed, again)
    assert snapshot(again) == snapshot(direct)
    assert len(direct.points_in("docs")) == len(source.rows("docs"))


class FlakySink(MemorySink):
    """Down for the first few write calls (an outage), then healthy."""

    def __init__(self, failures: int) -> None:
        super().__init__("flaky")
        self.failures = failures

    async def upsert(self, collection: str, points: Sequence[Any]) -> None:
        if self.failures > 0:
            self.failures -= 1
            self.down = True
        try:
            await super().upsert(collection, points)
        finally:
            self.down = False


async def test_sink_outage_is_retried_without_loss_or_dead_letters() -> None:
    source = make_source()
    for k in range(1, 101):
        source.upsert("docs", {"id": k, "body": f"doc {k}", "tag": "x"})
    sink = FlakySink(failures=3)
    state = StateStore("sqlite://")
    counts = await sync(source, sink, state=state)
    assert sink.failures == 0 and counts["upserted"] == 100 and not counts.get("failed")
    assert len(sink.points_in("docs")) == 100


class PickyEmbedder(HashEmbedder):
    """Rejects any text containing 'poison', like a model refusing an input."""

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if any("poison" in t for t in texts):
            raise EmbeddingError("input rejected by the model")
        return await super().embed(texts)


async def test_a_text_the_embedder_rejects_is_dead_lettered_alone() -> None:
    source = make_source()
    for k in range(1, 21):
        source.upsert("docs", {"id": k, "body": "poison" if k == 7 else f"doc {k}", "tag": "x"})
    sink = MemorySink()
    counts = await sync(source, sink, PickyEmbedder("default"))
    assert counts["failed"] == 1 and counts["upserted"] == 19
    assert len(sink.points_in("docs")) == 19


class RecordingEmbedder(PickyEmbedder):
    """Remembers how many texts each call was handed."""

    def __init__(self, name: str, batch_size: int) -> None:
        super().__init__(name, batch_size=batch_size)
        self.calls: list[int] = []

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.calls.append(len(texts))
        return await super().embed(texts)


async def test_a_batch_s_texts_reach_the_embedder_in_one_call() -> None:
    """The embedder gets every text of a batch at once (it sorts them by length and runs
    its model batches side by side); a rejected text is looked for in batches of the
    embedder's batch_size first, then one text at a time."""
    source = make_source()
    for k in range(1, 101):
        source.upsert("docs", {"id": k, "body": f"doc {k} " * (k % 9 + 1), "tag": "x"})
    healthy = RecordingEmbedder("default", batch_size=8)
    counts = await sync(source, MemorySink(), healthy)
    assert counts["upserted"] == 100 and healthy.calls == [100]

    source.upsert("docs", {"id": 50, "body": "poison", "tag": "x"})
    for k in range(101, 121):
        source.upsert("docs", {"id": k, "body": f"doc {k}", "tag": "x"})
    picky = RecordingEmbedder("default", batch_size=8)
    counts = await sync(source, MemorySink(), picky)
    assert counts["failed"] == 1 and counts["upserted"] == 119
    assert picky.calls[0] == 120 and sorted(picky.calls[1:]) == [1] * 8 + [8] * 15


async def test_texts_all_from_the_cache_call_no_embedder(tmp_path: Path) -> None:
    """Nothing left to embed, no embed call: the model is not even loaded."""
    source = make_source()
    source.upsert("docs", {"id": 1, "body": "the same words", "tag": "x"})
    url = f"sqlite:///{tmp_path}/state.db"
    first = RecordingEmbedder("default", batch_size=8)
    await sync(source, MemorySink(), first, state=StateStore(url))
    source.upsert("docs", {"id": 2, "body": "the same words", "tag": "x"})
    again = RecordingEmbedder("default", batch_size=8)
    counts = await sync(source, MemorySink(), again, state=StateStore(url))
    assert first.calls == [1] and again.calls == [] and counts["cache_hits"] == 1


async def test_stop_event_ends_a_streaming_run() -> None:
    source = make_source()
    source.upsert("docs", {"id": 1, "body": "a", "tag": "x"})
    sink = MemorySink()
    stop = asyncio.Event()
    async with Engine.open(
        CONFIG,
        sources={"app": source},
        sinks={"vectors": sink},
        embedders={"default": HashEmbedder("default")},
        state=StateStore("sqlite://"),
    ) as engine:
        task = asyncio.create_task(engine.run(stop=stop))
        source.upsert("docs", {"id": 2, "body": "b", "tag": "y"})
        while "docs" not in sink.aliases or len(sink.points_in("docs")) < 2:
            await asyncio.sleep(0.01)
        stop.set()
        result = await asyncio.wait_for(task, 10)
    assert result.counts["upserted"] == 2


async def test_a_point_the_sink_rejects_is_dead_lettered_alone(tmp_path: Path) -> None:
    source = make_source()
    for k in range(1, 41):
        source.upsert("docs", {"id": k, "body": f"doc {k}", "tag": "bad" if k == 13 else "x"})
    sink = RejectingSink("tag", "bad")
    url = f"sqlite:///{tmp_path}/state.db"
    counts = await sync(source, sink, state=StateStore(url))
    assert counts["failed"] == 1 and counts["upserted"] == 39
    source.upsert("docs", {"id": 5, "body": "doc 5", "tag": "bad"})  # payload-only, rejected
    source.upsert("docs", {"id": 6, "body": "doc 6", "tag": "y"})
    counts = await sync(source, sink, state=StateStore(url))
    state = StateStore(url)
    await state.open()
    assert counts["failed"] == 1 and counts["payload_only"] == 1
    letters = {d.key: d for d in await state.dead_letters()}
    assert set(letters) == {"13", "5"} and letters["13"].error_type == "sink"
    assert letters["5"].details["error_code"] == "sink_rejected"
    assert "tag 'bad'" in letters["5"].message
    assert sink.points_in("docs")[point_id("docs", 5)][1]["tag"] == "x"  # last good payload kept
    await state.close()
