"""Zero-downtime re-index (issue 13), in-process against SQLite and qdrant-edge: a new
dimension or template builds the next index version beside the live one while the live one
serves searches and follows the app's writes; the swap, the rollback, payload-only changes
in place, a manual re-index, the dry run's prediction and the previous version's expiry.
The kill -9 trials of a backfill are in tests/e2e/test_reindex_cli.py."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import App, load, streaming, sync_once, write_config
from vectorsync.embed.hash import HashEmbedder
from vectorsync.engine import Engine
from vectorsync.errors import PermanentError
from vectorsync.events import Event, IndexSwapped, ReindexProgress, ReindexStarted
from vectorsync.model import Point, content_hash, point_id
from vectorsync.render import Renderer
from vectorsync.sinks.base import CollectionSpec, SinkRecord

RECORDS = 20_000
DEADLINE = 300.0  # seconds a re-index may take on a loaded 2-core machine
TEXT = "{{ title }}\\n{{ body }}"
WORDS = ["alpha", "beta", "gamma", "delta", "vector", "graph", "sync", "chunk", "order"]


def config(
    folder: Path,
    *,
    dimension: int = 384,
    text: str = TEXT,
    sync: str = "",
    embedder: str | None = None,
    payload: str = '["author", "tags", "published"]',
    batch_size: int = 1000,
) -> Path:
    """The test project's config: the helpers' one with its embedder, template, payload
    list and [sync] settings under the test's control."""
    path = write_config(folder, text=text, batch_size=batch_size)
    body = path.read_text()
    body = body.replace(
        '[embedders.default]\nkind = "hash"',
        "[embedders.default]\n" + (embedder or f'kind = "hash"\ndimension = {dimension}'),
    )
    body = body.replace("[sync]\n", f"[sync]\n{sync}\n" if sync else "[sync]\n")
    body = body.replace('payload = ["author", "tags", "published"]', f"payload = {payload}")
    path.write_text(body)
    return path


def bulk(app: App, n: int, *, start: int = 1, rng: random.Random | None = None) -> None:
    """``n`` articles in one transaction (keys from ``start``)."""
    rng = rng or random.Random(n)
    rows = [
        (
            k,
            f"title {k}",
            " ".join(rng.choices(WORDS, k=5)),
            rng.choice(["ann", "bob", "cy"]),
            rng.choice(["a", "b"]),
            rng.randint(2000, 2030),
        )
        for k in range(start, start + n)
    ]
    with app.transaction():
        app.db.executemany("INSERT INTO articles VALUES (?, ?, ?, ?, ?, ?)", rows)


async def points(engine: Engine, collection: str) -> dict[str, SinkRecord]:
    """Every point of one of the mapping's physical collections, with its vector."""
    [made] = [v for v in await engine.indexes("articles") if v["collection"] == collection]
    sink = engine.sinks["vectors"]
    await engine._open_sinks()  # the engine opens its sinks lazily, once
    await sink.ensure_collection(
        CollectionSpec(name=collection, dimension=made["dimension"], distance="cosine")
    )
    return {r.id: r async for r in sink.scroll(collection, with_vectors=True)}


async def assert_version_matches(
    engine: Engine, app: App, collection: str, *, dimension: int, text: str = TEXT
) -> None:
    """``collection`` holds exactly one point per live row, whose vector is the hash
    embedding (of ``dimension``) of its current text and whose payload is current."""
    m = engine.mapping("articles")
    renderer = Renderer(m.model_copy(update={"text": text.replace("\\n", "\n")}))
    embedder = HashEmbedder(dimension=dimension)
    rows = app.rows()
    found = await points(engine, collection)
    expected = {point_id(m.name, k): k for k in rows}
    missing, orphaned = set(expected) - set(found), set(found) - set(expected)
    assert not missing and not orphaned, f"{collection}: missing {missing}, orphaned {orphaned}"
    for pid, key in expected.items():
        rendered = renderer.render(rows[key])
        record = found[pid]
        assert record.vector is not None and len(record.vector) == dimension, key
        assert {f: record.payload[f] for f in rendered.payload} == rendered.payload, key
        assert record.payload["_vs_text_hash"] == content_hash(embedder.model_id, rendered.text)
        want = embedder.vector(rendered.text)
        assert max(abs(a - b) for a, b in zip(record.vector, want, strict=True)) < 1e-5, key


async def versions(engine: Engine) -> dict[int, dict[str, Any]]:
    return {v["version"]: v for v in await engine.indexes("articles")}


async def next_event(stream: AsyncIterator[Event], kind: type[Event], timeout: float) -> Any:
    """The next event of ``kind`` (TimeoutError after ``timeout`` seconds)."""

    async def find() -> Event:
        async for event in stream:
            if isinstance(event, kind):
                return event
        raise AssertionError("the event stream ended")

    return await asyncio.wait_for(find(), timeout)


async def until(condition: Any, timeout: float, what: str) -> None:
    """Wait until the coroutine function ``condition`` returns true."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        await asyncio.sleep(0.05)


class Writer:
    """The app writing ~50 rows/s on its own connection (updates of text and metadata,
    inserts, deletes) until stopped; remembers what it wrote."""

    def __init__(self, app: App, seed: int, first_new_key: int) -> None:
        self.app = app
        self.rng = random.Random(seed)
        self.next_key = first_new_key
        self.written: set[int] = set()
        self.deleted: set[int] = set()
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        own = self.app.clone()
        try:
            while not self._stop.is_set():
                self._one(own)
                self.count += 1
                # pacing the load (50 rows/s), not synchronisation
                self._stop.wait(0.02)
        finally:
            own.close()

    def _one(self, app: App) -> None:
        rng = self.rng
        op = rng.random()
        if op < 0.1:
            key = self.next_key
            self.next_key += 1
            app.insert(key, body=" ".join(rng.choices(WORDS, k=4)))
        else:
            key = rng.randint(1, RECORDS)
            if key in self.deleted:
                return
            if op < 0.15:
                app.delete(key)
                self.deleted.add(key)
            elif op < 0.6:
                app.update(key, body=f"rewritten {self.count} " + rng.choice(WORDS))
            else:
                app.update(key, author=rng.choice(["dee", "eve"]), published=rng.randint(1, 9))
        self.written.add(key)

    @contextlib.contextmanager
    def running(self) -> Iterator[Writer]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()


class Reader:
    """``engine.search`` every 50 ms until stopped: its errors and empty results."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.calls = 0
        self.errors: list[BaseException] = []
        self.empty = 0
        self.stop = asyncio.Event()
        self.dimensions: set[int] = set()

    async def run(self) -> None:
        while not self.stop.is_set():
            try:
                hits = await self.engine.search("articles", "alpha gamma title", limit=3)
            except Exception as exc:
                self.errors.append(exc)
            else:
                self.empty += not hits
            self.calls += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.05)


async def test_a_dimension_change_reindexes_without_downtime_and_rolls_back(
    workdir: Path, app: App
) -> None:
    bulk(app, RECORDS)
    await sync_once(config(workdir, dimension=384))
    cfg = config(workdir, dimension=256)
    async with Engine.open(load(cfg)) as engine:
        events = engine.events()
        reader = Reader(engine)
        reading = asyncio.create_task(reader.run())
        stop = asyncio.Event()
        writer = Writer(app, seed=13, first_new_key=RECORDS + 1)
        with writer.running():
            syncing = asyncio.create_task(engine.run(stop=stop))
            started = await next_event(events, ReindexStarted, DEADLINE)
            assert (started.version, started.reason) == (2, "model, dimension")
            calls_at_start = reader.calls
            progress = await next_event(events, ReindexProgress, DEADLINE)
            assert progress.version == 2 and progress.total == RECORDS
            swapped = await next_event(events, IndexSwapped, DEADLINE)
            assert (swapped.version, swapped.previous) == (2, 1)
            searched_while_building = reader.calls - calls_at_start
            calls_at_swap = reader.calls
            await until(lambda: _later(reader, calls_at_swap + 5), 60, "searches after the swap")
        await engine.wait_for(await engine.head(), timeout=120)
        reader.stop.set()
        await reading
        stop.set()
        await syncing

        assert not reader.errors, reader.errors[:3]
        assert reader.empty == 0
        assert searched_while_building > 0
        assert writer.count > 0 and writer.written
        listed = await versions(engine)
        assert listed[2]["state"] == "live" and listed[2]["dimension"] == 256
        assert listed[1]["state"] == "previous" and listed[1]["dimension"] == 384
        live_rows = len(app.rows())
        assert listed[1]["records"] == listed[2]["records"] == live_rows
        # every live point is 256-d, and every write the writer made is in it (latest content)
        await assert_version_matches(engine, app, "articles__v2", dimension=256)
        found_v2 = await points(engine, "articles__v2")
        report = await engine.check("articles", mode="full")
        assert report.consistent, report.as_dict()
        # the previous version was maintained all along: a rollback is instant and current
        before = await points(engine, "articles__v1")
        v1_schema = next(iter(before.values())).payload["_vs_schema"]
        assert v1_schema != next(iter(found_v2.values())).payload["_vs_schema"]
        rolled = await engine.reindex("articles", rollback=True)
        assert rolled == {"mapping": "articles", "live": 1, "rolled_back": True}
        listed = await versions(engine)
        assert (listed[1]["state"], listed[2]["state"]) == ("live", "previous")
        await assert_version_matches(engine, app, "articles__v1", dimension=384)
        assert await engine.sinks["vectors"].alias_target("articles") == "articles__v1"
        # and searches read it, with its own 384-d model
        hits = await engine.search("articles", "alpha gamma title", limit=3)
        assert hits and all(h.record.payload["_vs_schema"] == v1_schema for h in hits)
        assert (await engine.check("articles", mode="full")).consistent


async def _later(reader: Reader, calls: int) -> bool:
    return reader.calls >= calls


async def test_the_previous_version_is_dropped_when_kept_long_enough(
    workdir: Path, app: App
) -> None:
    """With keep_previous = "1s" a streaming run drops the previous version once its second
    is up — without a restart — and goes on syncing the live one."""
    bulk(app, 300)
    keep = 'keep_previous = "1s"'
    await sync_once(config(workdir, sync=keep))
    async with Engine.open(load(config(workdir, dimension=256, sync=keep))) as engine:
        events = engine.events()
        sink = engine.sinks["vectors"]

        async def dropped() -> bool:
            return (await versions(engine))[1]["state"] == "dropped"

        async with streaming(engine) as syncing:
            swapped = await next_event(events, IndexSwapped, DEADLINE)
            assert swapped.version == 2
            await until(dropped, 60, "version 1 dropped while the run streams")
            assert not syncing.done()
            listed = await versions(engine)
            assert listed[1]["dropped_at"] - listed[1]["retired_at"] >= 1.0
            assert "articles__v1" not in await sink.collections()
            assert listed[1]["records"] == 0 and listed[2]["state"] == "live"
            # the run goes on with the live version alone
            app.update(7, body="after the drop")
            app.insert(301)
            await engine.wait_for(await engine.head(), timeout=60)
        await assert_version_matches(engine, app, "articles__v2", dimension=256)
        assert (await engine.check("articles", mode="full")).consistent


async def test_a_payload_list_change_is_written_in_place_without_embedding(
    workdir: Path, app: App
) -> None:
    bulk(app, 400)
    await sync_once(config(workdir))
    async with Engine.open(load(config(workdir))) as engine:
        before = await points(engine, "articles__v1")
    embedder = HashEmbedder("default")
    counts = await sync_once(config(workdir, payload='["author", "published"]'), embedder)
    assert embedder.texts_embedded == 0 and counts.get("upserted", 0) == 0
    assert counts["payload_only"] == 400
    async with Engine.open(load(config(workdir, payload='["author", "published"]'))) as engine:
        listed = await versions(engine)
        assert [(v, r["state"]) for v, r in listed.items()] == [(1, "live")]
        after = await points(engine, "articles__v1")
        assert after.keys() == before.keys()
        for pid, record in after.items():
            assert record.vector == before[pid].vector
            assert "tags" not in record.payload
            assert record.payload["author"] == before[pid].payload["author"]
        assert (await engine.check("articles", mode="full")).consistent


MINILM = 'kind = "sentence-transformers"\nthreads = 1'


@pytest.mark.slow
@pytest.mark.embedding_model
async def test_a_template_change_with_minilm_builds_verifies_and_swaps(
    workdir: Path, app: App
) -> None:
    """The bundled MiniLM on 2,000 records: a new template is a new version, built beside
    the live one, verified against fresh embeddings and swapped; then a payload-list
    change goes to both versions in place, with no embedding and no new version."""
    bulk(app, 2000)
    await sync_once(config(workdir, embedder=MINILM))
    new_text = "{{ body }} by {{ author }}"
    async with Engine.open(load(config(workdir, embedder=MINILM, text=new_text))) as engine:
        seen: list[Event] = []
        stream = engine.events()

        async def collect() -> None:
            async for event in stream:
                seen.append(event)

        collecting = asyncio.create_task(collect())
        result = await engine.run(once=True)
        await until(lambda: _any(seen, IndexSwapped), 10, "the swap's event delivered")
        collecting.cancel()
        started = [e for e in seen if isinstance(e, ReindexStarted)]
        swapped = [e for e in seen if isinstance(e, IndexSwapped)]
        progress = [e for e in seen if isinstance(e, ReindexProgress)]
        assert [(e.version, e.reason) for e in started] == [(2, "text")]
        assert [(e.version, e.previous) for e in swapped] == [(2, 1)]
        assert progress and progress[-1].done == 2000
        rows = app.rows()
        assert result.counts["embedded"] == len({(r["body"], r["author"]) for r in rows.values()})
        listed = await versions(engine)
        assert (listed[1]["state"], listed[2]["state"]) == ("previous", "live")
        assert listed[1]["model"] == listed[2]["model"] == engine.embedders["default"].model_id
        assert (await engine.check("articles", mode="full")).consistent
        # the new version's vectors are MiniLM's embeddings of the new template's texts
        found = await points(engine, "articles__v2")
        keys = [1, 500, 1999]
        fresh = await engine.embedders["default"].embed(
            [f"{rows[k]['body']} by {rows[k]['author']}" for k in keys]
        )
        for key, vector in zip(keys, fresh, strict=True):
            stored = found[point_id("articles", key)].vector
            assert stored is not None
            assert sum(a * b for a, b in zip(vector, stored, strict=True)) > 0.999
    payload = '["author", "published"]'
    cfg = config(workdir, embedder=MINILM, text=new_text, payload=payload)
    async with Engine.open(load(cfg)) as engine:
        result = await engine.run(once=True)
        assert result.counts.get("embedded", 0) == 0
        assert result.counts["payload_only"] >= 2000
        assert sorted(await versions(engine)) == [1, 2]
        for collection in ("articles__v1", "articles__v2"):
            written = await points(engine, collection)
            assert len(written) == 2000
            assert not any("tags" in r.payload for r in written.values()), collection
        assert (await engine.check("articles", mode="full")).consistent


async def _any(seen: list[Event], kind: type[Event]) -> bool:
    return any(isinstance(e, kind) for e in seen)


async def test_a_version_that_does_not_verify_is_repaired_before_it_goes_live(
    workdir: Path, app: App
) -> None:
    """Points in the new collection that its build did not write (a foreign one, one of a
    key the source does not have) fail its verification: they are removed and the build
    verified again — it never goes live with them, and `run --once` does not loop."""
    bulk(app, 200)
    await sync_once(config(workdir))
    async with Engine.open(load(config(workdir, dimension=256))) as engine:
        await engine.prepare()  # version 2's collection is made beside the live one
        vector = HashEmbedder(dimension=256).vector("stray")
        stray = [
            Point(id=str(uuid.uuid4()), vector=vector, payload={"note": "not ours"}),
            Point(id=point_id("articles", 999), vector=vector, payload={"_vs_key": 999}),
        ]
        await engine.sinks["vectors"].upsert("articles__v2", stray)
        await asyncio.wait_for(engine.run(once=True), DEADLINE)
        listed = await versions(engine)
        assert (listed[1]["state"], listed[2]["state"]) == ("previous", "live")
        await assert_version_matches(engine, app, "articles__v2", dimension=256)
        assert listed[2]["backfill"]["records"] == 200


class Unsteady(HashEmbedder):
    """Never the same vector twice for a text (a model that is not deterministic)."""

    def __init__(self) -> None:
        super().__init__("default", dimension=256)
        self.rng = random.Random(0)

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        vectors = await super().embed(texts)
        return [[x + self.rng.uniform(-0.2, 0.2) for x in v] for v in vectors]


async def test_a_version_that_never_verifies_fails_the_run_and_stays_out(
    workdir: Path, app: App
) -> None:
    bulk(app, 100)
    await sync_once(config(workdir))
    cfg = load(config(workdir, dimension=256))
    async with Engine.open(cfg, embedders={"default": Unsteady()}) as engine:
        with pytest.raises(PermanentError, match=r"index version 2 did not verify 3 times"):
            await asyncio.wait_for(engine.run(once=True), DEADLINE)
        listed = await versions(engine)
        assert (listed[1]["state"], listed[2]["state"]) == ("live", "building")
        await assert_version_matches(engine, app, "articles__v1", dimension=384)
