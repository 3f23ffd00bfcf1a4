"""The skeleton's guarantees, every source kind → qdrant-edge and SQLite → Chroma and pgvector,
in-process against the real
engines (SQLite, PostgreSQL with logical replication, PostgreSQL with a trigger outbox)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.helpers import App, check, load, sync_once, write_config
from vectorsync.embed.hash import HashEmbedder
from vectorsync.engine import Engine

pytestmark = [pytest.mark.all_sources, pytest.mark.all_sinks]


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_changes_converge(workdir: Path, app: App, seed: int) -> None:
    await random_changes_converge(workdir, app, seed)


async def random_changes_converge(
    workdir: Path, app: App, seed: int, extra_mapping: str = ""
) -> None:
    """Random inserts, updates and deletes, snapshotted then streamed: sink = source."""
    rng = random.Random(seed)
    app.random_ops(rng, 150)
    cfg = write_config(workdir, batch_size=37, extra_mapping=extra_mapping)
    await sync_once(cfg)  # snapshot of the existing rows
    await check(cfg, app)
    app.random_ops(rng, 400)
    await sync_once(cfg)
    await check(cfg, app)


async def test_existing_rows_snapshot_then_stream_without_gap(workdir: Path, app: App) -> None:
    for k in range(1, 51):
        app.insert(k)
    cfg = write_config(workdir)
    async with Engine.open(load(cfg)) as engine:
        await engine.prepare()  # triggers installed + snapshot enqueued atomically
        app.update(3, body="changed between setup and the first run")
        app.insert(51)
        app.delete(7)
        await engine.run(once=True)
    await check(cfg, app)


async def test_minimal_embedding(workdir: Path, app: App) -> None:
    for k in range(1, 21):
        app.insert(k)
    cfg = write_config(workdir)
    embedder = HashEmbedder("default")
    counts = await sync_once(cfg, embedder)
    assert embedder.texts_embedded == 20 and counts["upserted"] == 20

    app.update(5, author="zed", published=1999)  # metadata only
    app.update(6, tags="x,y")
    before = embedder.texts_embedded
    counts = await sync_once(cfg, embedder)
    assert embedder.texts_embedded == before, "a metadata-only change called the embedder"
    assert counts["payload_only"] == 2 and counts["upserted"] == 0

    app.update(7, body="a new body")
    app.update(8, title="a new title")
    app.update(8, title="another title")  # two changes of one key coalesce: one embedding
    before = embedder.texts_embedded
    counts = await sync_once(cfg, embedder)
    assert embedder.texts_embedded - before == 2
    assert counts["upserted"] == 2

    before = embedder.texts_embedded
    counts = await sync_once(cfg, embedder)
    assert embedder.texts_embedded == before
    assert counts.get("upserted", 0) == counts.get("payload_only", 0) == 0
    app.update(9, author=None)  # the trigger fires but the rendered text is the same
    app.update(10, body="body of 10")  # rewritten with the same value: nothing to write
    counts = await sync_once(cfg, embedder)
    assert embedder.texts_embedded == before
    # SurrealDB's change feed records no write that changes nothing: none to skip
    skipped = 0 if app.kind == "surrealdb" else 1
    assert counts.get("skipped", 0) == skipped and counts["payload_only"] == 1
    await check(cfg, app)


async def test_reverted_text_comes_from_the_embedding_cache(workdir: Path, app: App) -> None:
    app.insert(1, body="first version")
    cfg = write_config(workdir)
    embedder = HashEmbedder("default")
    await sync_once(cfg, embedder)
    app.update(1, body="second version")
    await sync_once(cfg, embedder)
    app.update(1, body="first version")
    counts = await sync_once(cfg, embedder)
    assert embedder.texts_embedded == 2 and counts["cache_hits"] == 1
    await check(cfg, app)


async def test_template_change_builds_a_new_version_embedding_only_changed_texts(
    workdir: Path, app: App
) -> None:
    for k in range(1, 11):
        app.insert(k, body=f"body {k}")
    app.insert(11, body="")
    cfg = write_config(workdir)
    embedder = HashEmbedder("default")
    await sync_once(cfg, embedder)
    # a template whose output differs only for the row with an empty body
    cfg = write_config(workdir, text="{{ title }}\\n{{ body or 'untitled' }}")
    counts = await sync_once(cfg, embedder)  # builds version 2 beside version 1, swaps
    assert counts["changes"] == 0  # a backfill of the new version, not changes of the feed
    assert counts["upserted"] == 11 and counts["cache_hits"] == 10
    assert counts["embedded"] == 1  # the 10 unchanged texts came from the cache
    # (and the swap's verification embedded a sample afresh, to compare)
    async with Engine.open(load(cfg)) as engine:
        states = {v["version"]: v["state"] for v in await engine.indexes("articles")}
    assert states == {1: "previous", 2: "live"}
    await check(cfg, app)


async def test_duplicated_and_shuffled_changes_converge_to_the_same_state(
    workdir: Path, app: App
) -> None:
    await duplicated_and_shuffled_converge(workdir, app)


async def duplicated_and_shuffled_converge(
    workdir: Path, app: App, extra_mapping: str = ""
) -> None:
    """Every change of a history delivered again, twice each in random order: the same
    state, nothing new written (the chunking tests run it on a chunked mapping)."""
    rng = random.Random(7)
    app.random_ops(rng, 200)
    cfg = write_config(workdir, batch_size=25, extra_mapping=extra_mapping)
    await sync_once(cfg)
    app.random_ops(rng, 300)
    await sync_once(cfg)
    await check(cfg, app)
    # Deliver every change of the history again: twice each, in random order.
    replay = [(k, op) for k in range(1, 201) for op in ("insert", "update", "delete")] * 2
    rng.shuffle(replay)
    app.inject(replay)
    counts = await sync_once(cfg)
    assert counts["changes"] == len(replay)
    assert counts.get("upserted", 0) == 0 and counts.get("payload_only", 0) == 0
    await check(cfg, app)


async def test_bad_rows_are_dead_lettered_and_the_rest_syncs(workdir: Path, app: App) -> None:
    for k in range(1, 11):
        app.insert(k)
    app.update(2, title=None, body=None)  # NULL text
    app.update(3, body="x" * 500)  # over max_text_length, which this mapping refuses
    app.update(4, published=0)  # the template divides by it
    cfg = write_config(
        workdir,
        text="{{ title }}\\n{{ body }}{% if published == 0 %}{{ 1 // published }}{% endif %}",
        extra_mapping='max_text_length = 300\nlong_text = "dead_letter"',
    )
    counts = await sync_once(cfg)
    assert counts["failed"] == 3 and counts["upserted"] == 7
    async with Engine.open(load(cfg)) as engine:
        letters = {d.key: d for d in await engine.state.dead_letters()}
        [status] = await engine.status()
    assert status.dead_letters == 3 and status.records == 7
    assert letters["2"].error_type == "validation" and "body, title" in letters["2"].message
    assert letters["2"].details["error_code"] == "empty_text" and letters["2"].details["key"] == 2
    assert letters["3"].details["error_code"] == "text_too_long"
    assert "max_text_length" in letters["3"].message
    assert letters["4"].error_type == "render" and "ZeroDivisionError" in letters["4"].message
    assert letters["4"].details["row"]["published"] == 0

    app.update(2, title="fixed", body="fixed")  # fixing the row resolves its dead letter
    counts = await sync_once(cfg)
    async with Engine.open(load(cfg)) as engine:
        assert {d.key for d in await engine.state.dead_letters()} == {"3", "4"}
        resolved = await engine.state.dead_letters(status="resolved")
    assert [d.key for d in resolved] == ["2"]


async def test_primary_key_change_moves_the_point(workdir: Path, app: App) -> None:
    app.insert(1)
    app.insert(2)
    cfg = write_config(workdir)
    await sync_once(cfg)
    app.change_key(1, 100)
    counts = await sync_once(cfg)
    assert counts["deleted"] == 1 and counts["upserted"] == 1
    await check(cfg, app)


async def test_wait_for_makes_a_write_searchable_the_moment_it_returns(
    workdir: Path, app: App
) -> None:
    import asyncio

    from vectorsync.model import point_id

    app.insert(1)
    cfg = write_config(workdir)
    async with Engine.open(load(cfg)) as engine:
        await engine.prepare()  # capture installed: from here every write has a position
        stop = asyncio.Event()
        streaming = asyncio.create_task(engine.run(stop=stop))
        for k in range(2, 7):
            app.insert(k, body=f"fresh body {k}")
            position = await engine.head()
            await engine.wait_for(position, timeout=30)
            [hit] = await engine.sinks["vectors"].retrieve("articles", [point_id("articles", k)])
            assert hit.payload["_vs_key"] == k
        with pytest.raises(TimeoutError, match="not applied within"):
            await engine.wait_for(2**62, timeout=0.3)  # a position no source has reached
        stop.set()
        await streaming
