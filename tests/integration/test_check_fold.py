"""A full check folding its source in a process of its own (``check_fold``): the same
drift, the same roots as folding in the checking process, and nothing lost when the
process cannot take a page or dies (against real SQLite and qdrant-edge)."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import App, load
from tests.integration.test_check import edit_sink, pid, synced
from vectorsync import check_fold
from vectorsync.check import CheckReport
from vectorsync.check_fold import SourceFold
from vectorsync.engine import Engine
from vectorsync.model import PayloadUpdate, Point


@pytest.fixture
def apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every full check folds its source apart, however small the mapping."""
    monkeypatch.setattr(check_fold, "APART_RECORDS", 0)


async def drifted(workdir: Path, app: App) -> Path:
    """300 records synced, then drift of every kind on both sides, and a row that cannot be
    rendered (no text)."""
    cfg = await synced(workdir, app)
    sink = await edit_sink(workdir)
    await sink.delete("articles", [pid(k) for k in (1, 2)])
    await sink.upsert(
        "articles", [Point(id=str(uuid.uuid4()), vector=[0.1] * 384, payload={"x": 1})]
    )
    await sink.update_payloads(
        "articles",
        [
            PayloadUpdate(id=pid(11), set={"_vs_text_hash": "0" * 32}, payload={}),
            PayloadUpdate(id=pid(12), set={"_vs_schema": "old-schema"}, payload={}),
        ],
    )
    await sink.close()
    app.update(20, body="rewritten while stopped")
    app.update(22, author="bob")
    app.update(23, title="", body="")  # unrenderable: its point is stale
    app.delete(21)
    app.insert(999)
    return cfg


def summary(report: CheckReport) -> dict[str, Any]:
    return {
        "counts": report.counts,
        "keys": {c: sorted(map(str, report.keys(c))) for c in report.counts},
        "orphaned": sorted(d.point_id for d in report.drift if d.category == "orphaned"),
        "roots": (report.details["source_root"], report.details["sink_root"]),
        "records": (report.source_records, report.sink_points),
    }


async def test_folded_apart_finds_the_same_drift_with_the_same_roots(
    workdir: Path, app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = await drifted(workdir, app)
    async with Engine.open(load(cfg)) as engine:
        here = await engine.check("articles", mode="full")
        monkeypatch.setattr(check_fold, "APART_RECORDS", 0)
        there = await engine.check("articles", mode="full")
    assert here.details["source_folded"] == "here"
    assert there.details["source_folded"] == "apart"
    assert summary(there) == summary(here)
    assert set(there.keys("missing")) == {1, 2, 999}
    assert set(there.keys("stale")) == {11, 20, 23}
    assert set(there.keys("payload_mismatch")) == {22}
    assert set(there.keys("outdated")) == {12}


async def test_a_check_folded_apart_after_repair_is_consistent(
    workdir: Path, app: App, apart: None
) -> None:
    cfg = await drifted(workdir, app)
    app.update(23, title="mended")
    async with Engine.open(load(cfg)) as engine:
        report = await engine.check("articles", mode="full")
        assert not report.consistent
        await engine.repair(report)
        after = await engine.check("articles", mode="full")
    assert after.consistent, after.counts
    assert after.details["source_folded"] == "apart"
    assert after.details["source_root"] == after.details["sink_root"]


async def test_a_folding_process_killed_midway_costs_time_not_correctness(
    workdir: Path,
    app: App,
    apart: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Killed after its first page (a failpoint in the process): its buckets are gone, so
    the whole source is folded again in the checking process, and the check is exact."""
    cfg = await drifted(workdir, app)
    async with Engine.open(load(cfg)) as engine:
        expected = summary(await engine.check("articles", mode="full"))
        monkeypatch.setattr("vectorsync.check._FOLD_PAGE", 50)  # several pages of 300 rows
        monkeypatch.setenv("VECTORSYNC_FAILPOINT", "check_fold_page:1")  # the process reads it
        with caplog.at_level(logging.WARNING, logger="vectorsync.check"):
            report = await engine.check("articles", mode="full")
    assert summary(report) == expected
    assert report.details["source_folded"] == "here"
    assert any("folds the source of 'articles' again" in r.getMessage() for r in caplog.records)


class _Opaque:
    """A driver's own value type: it renders, but a local class does not pickle."""

    def __str__(self) -> str:
        return "opaque value"


async def test_a_page_that_does_not_pickle_is_folded_here(workdir: Path, app: App) -> None:
    cfg = await synced(workdir, app, n=20)

    class Local(_Opaque):
        pass

    async with Engine.open(load(cfg)) as engine:
        digests = (await engine.checker("articles")).digests
    plain = [
        (k, {"id": k, "title": f"t{k}", "body": "b", "author": "a", "tags": "x"})
        for k in range(100)
    ]
    odd = [(k, {**row, "body": Local()}) for k, row in plain[:50]]
    rest = plain[50:]
    here = SourceFold(digests, apart=False)
    async with here:
        await here.add(odd)
        await here.add(rest)
        expected = await here.result()
    there = SourceFold(digests, apart=True)
    async with there:
        await there.add(odd)  # cannot be sent: folded in this process
        await there.add(rest)
        folded = await there.result()
    assert there.pages_apart == 1
    assert folded == expected


async def test_unrenderable_rows_are_named_by_the_folding_process(workdir: Path, app: App) -> None:
    cfg = await synced(workdir, app, n=5)
    async with Engine.open(load(cfg)) as engine:
        digests = (await engine.checker("articles")).digests
    rows = [(k, {"id": k, "title": "", "body": None if k % 2 else "b"}) for k in range(10)]
    fold = SourceFold(digests, apart=True)
    async with fold:
        await fold.add(rows)
        _, unrenderable = await fold.result()
    assert fold.pages_apart == 1
    assert unrenderable == {1, 3, 5, 7, 9}
