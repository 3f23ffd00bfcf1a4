"""The consistency checker against real SQLite and qdrant-edge: drift injected into both
stores while vectorsync is stopped is found exactly, repair makes the next check clean."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import pytest

from tests.helpers import App, load, write_config
from vectorsync.check import wilson_interval
from vectorsync.engine import Engine
from vectorsync.model import PayloadUpdate, Point, point_id
from vectorsync.sinks.base import CollectionSpec
from vectorsync.sinks.qdrant_edge import QdrantEdgeSink


async def synced(workdir: Path, app: App, n: int = 300) -> Path:
    app.db.execute("BEGIN")
    for k in range(1, n + 1):
        app.insert(k, body=f"body {k}")
    app.db.execute("COMMIT")
    cfg = write_config(workdir)
    async with Engine.open(load(cfg)) as engine:
        await engine.run(once=True)
    return cfg


async def edit_sink(workdir: Path) -> QdrantEdgeSink:
    sink = QdrantEdgeSink("drift", workdir / ".vectorsync" / "qdrant")
    await sink.open()
    await sink.ensure_collection(CollectionSpec(name="articles", dimension=384, distance="cosine"))
    return sink


def pid(key: int) -> str:
    return point_id("articles", key)


async def test_injected_drift_is_found_exactly_in_every_category_and_repaired(
    workdir: Path, app: App
) -> None:
    cfg = await synced(workdir, app)
    sink = await edit_sink(workdir)
    # into the sink, behind vectorsync's back
    await sink.delete("articles", [pid(k) for k in (1, 2, 3)])
    foreign = [str(uuid.uuid4()) for _ in range(2)]
    await sink.upsert(
        "articles", [Point(id=f, vector=[0.1] * 384, payload={"x": 1}) for f in foreign]
    )
    [rec] = await sink.retrieve("articles", [pid(10)])
    payload = dict(rec.payload)
    await sink.update_payloads(
        "articles",
        [
            PayloadUpdate(
                id=pid(10), set={"author": "mallory"}, payload={**payload, "author": "mallory"}
            ),
            PayloadUpdate(id=pid(11), set={"_vs_text_hash": "0" * 32}, payload={}),
            PayloadUpdate(id=pid(12), set={"_vs_schema": "old-schema"}, payload={}),
        ],
    )
    await sink.close()
    # into the source while vectorsync is stopped
    app.update(20, body="rewritten while stopped")
    app.delete(21)
    app.insert(999)
    app.update(22, author="bob")

    async with Engine.open(load(cfg)) as engine:
        report = await engine.check("articles")
        assert not report.consistent
        found = {c: set(report.keys(c)) for c in report.counts}
        assert found["missing"] == {1, 2, 3, 999}
        assert found["stale"] == {11, 20}
        assert found["payload_mismatch"] == {10, 22}
        assert found["outdated"] == {12}
        orphaned = {d.point_id for d in report.drift if d.category == "orphaned"}
        assert orphaned == {*foreign, pid(21)}
        assert report.counts == {
            "missing": 4,
            "orphaned": 3,
            "outdated": 1,
            "stale": 2,
            "payload_mismatch": 2,
            "dead_lettered": 0,
        }
        assert report.details["buckets_differing"] <= 12
        assert report.details["source_root"] != report.details["sink_root"]

        quick = await engine.check("articles", mode="quick")
        assert set(quick.keys("missing")) == {1, 2, 3, 999}
        assert {d.point_id for d in quick.drift if d.category == "orphaned"} == orphaned

        await engine.repair(report)
        after = await engine.check("articles")
        assert after.consistent and after.details["source_root"] == after.details["sink_root"]
        stored = await engine.state.checks(limit=10)
    assert [c["consistent"] for c in stored[:3]] == [1, 0, 0]
    assert all(c["duration_ms"] >= 0 and c["source_records"] for c in stored)
    assert stored[2]["counts"]["missing"] == 4 and stored[1]["mode"] == "quick"


async def test_a_template_change_is_checked_against_the_version_that_is_live(
    workdir: Path, app: App
) -> None:
    """Until the new index version is built and swapped, the live one (the old template)
    is what searches read and what a check verifies: it is consistent, not stale."""
    await synced(workdir, app, n=20)
    cfg = write_config(workdir, text="{{ title }} / {{ body }}")
    async with Engine.open(load(cfg)) as engine:
        report = await engine.check("articles")
        assert report.consistent and report.counts["stale"] == 0
        await engine.run(once=True)  # builds version 2 with the new template, swaps it live
        assert [v["state"] for v in await engine.indexes("articles")] == ["previous", "live"]
        after = await engine.check("articles")
        assert after.consistent and after.source_records == 20


async def test_sample_interval_covers_the_true_rate_in_95_of_100_trials(
    workdir: Path, app: App
) -> None:
    cfg = await synced(workdir, app, n=2000)
    drifted = random.Random(5).sample(range(1, 2001), 140)  # a true rate of 7%
    sink = await edit_sink(workdir)
    await sink.delete("articles", [pid(k) for k in drifted[:70]])
    await sink.update_payloads(
        "articles",
        [PayloadUpdate(id=pid(k), set={"_vs_text_hash": "bad"}, payload={}) for k in drifted[70:]],
    )
    await sink.close()
    true_rate = 140 / 2000
    covered = 0
    async with Engine.open(load(cfg)) as engine:
        checker = await engine.checker("articles")
        for seed in range(100):
            report = await checker.sample(200, seed=seed)
            est = report.details["estimate"]
            covered += est["low"] <= true_rate <= est["high"]
    assert covered >= 95, f"the 95% interval covered the true rate in {covered} of 100 trials"


@pytest.mark.parametrize(("hits", "n"), [(0, 50), (7, 100), (50, 50), (3, 1000)])
def test_wilson_interval_contains_the_point_estimate(hits: int, n: int) -> None:
    low, high = wilson_interval(hits, n)
    assert 0 <= low <= hits / n <= high <= 1


async def test_prove_mode_finds_source_drift_and_sink_count_changes(
    workdir: Path, app: App
) -> None:
    cfg = await synced(workdir, app, n=200)
    async with Engine.open(load(cfg)) as engine:
        clean = await engine.check("articles", mode="prove")
        assert clean.consistent and clean.details["buckets_differing"] == 0
    app.update(5, body="edited while stopped")
    app.update(6, author="someone")  # a payload column: part of the row digest too
    app.update(7, published=2020)  # rewritten with the same value: no drift
    app.delete(8)
    app.insert(500)
    async with Engine.open(load(cfg)) as engine:
        report = await engine.check("articles", mode="prove")
        assert set(report.keys("stale")) == {5, 6}
        assert set(report.keys("missing")) == {500}
        assert set(report.keys("orphaned")) == {"8"}
        assert report.details["sink_count_matches"]
        await engine.run(once=True)
        assert (await engine.check("articles", mode="prove")).consistent
    sink = await edit_sink(workdir)
    await sink.delete("articles", [pid(9)])
    await sink.close()
    async with Engine.open(load(cfg)) as engine:
        tampered = await engine.check("articles", mode="prove")
    assert not tampered.consistent and not tampered.details["sink_count_matches"]
