"""Conflicts: payloads edited in the sink by someone else, resolved by the mapping's policy
(source_wins, latest_wins, merge), logged once, and written back to the source."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_cli import cli
from tests.helpers import App, load, write_config
from tests.integration.test_http import client, metric
from vectorsync.config import Config
from vectorsync.embed.hash import HashEmbedder
from vectorsync.engine import Engine, build_sink
from vectorsync.model import PayloadUpdate, point_id
from vectorsync.sinks.base import CollectionSpec, Sink

SINKS = {
    "qdrant-edge": 'kind = "qdrant-edge"\npath = ".vectorsync/qdrant"',
    "chroma": 'kind = "chroma"\npath = ".vectorsync/chroma"',
}
FIELDS = ("author", "tags", "published")


def _config(workdir: Path, sink: str, policy: str) -> Config:
    return load(write_config(workdir, sink=SINKS[sink], extra_mapping=policy))


async def _sink(config: Config) -> Sink:
    sink = build_sink("vectors", config.sinks["vectors"], config)
    await sink.open()
    await sink.ensure_collection(CollectionSpec(name="articles", dimension=384, distance="cosine"))
    return sink


async def _edit(config: Config, edits: dict[int, dict[str, Any]]) -> None:
    """Someone else edits payload fields of points, in the sink directly."""
    sink = await _sink(config)
    try:
        ids = {point_id("articles", k): k for k in edits}
        held = {r.id: r for r in await sink.retrieve("articles", list(ids))}
        updates = [
            PayloadUpdate(id=pid, set=edits[k], payload={**held[pid].payload, **edits[k]})
            for pid, k in ids.items()
        ]
        assert await sink.update_payloads("articles", updates) == []
    finally:
        await sink.close()


async def _payloads(config: Config) -> dict[int, dict[str, Any]]:
    sink = await _sink(config)
    try:
        found = [r async for r in sink.scroll("articles")]
    finally:
        await sink.close()
    return {r.payload["_vs_key"]: {f: r.payload.get(f) for f in FIELDS} for r in found}


async def _sync(config: Config) -> tuple[dict[str, int], list[dict[str, Any]], bool]:
    async with Engine.open(config, embedders={"default": HashEmbedder()}) as engine:
        result = await engine.run(once=True)
        report = await engine.check("articles", mode="full")
        logged = await engine.state.conflicts(mapping="articles")
    return result.counts, logged, report.consistent


def _seed(app: App) -> None:
    for k in range(1, 6):
        app.insert(k, author="ann", tags="a", published=2020)


@pytest.mark.parametrize("sink", sorted(SINKS))
@pytest.mark.parametrize("tie", ["source", "sink"])
async def test_merge_keeps_what_only_the_sink_changed(
    workdir: Path, app: App, sink: str, tie: str
) -> None:
    _seed(app)
    config = _config(workdir, sink, f'conflicts = "merge"\nmerge_tie = "{tie}"')
    await _sync(config)
    await _edit(
        config,
        {
            1: {"tags": "curated"},  # only the sink changes it
            2: {"author": "sink-bob"},  # both change it
            3: {"tags": "reviewed"},  # the sink one field, the source another
        },
    )
    app.update(2, author="src-carl")
    app.update(3, author="src-dora")
    app.update(4, body="a new body")  # the source alone
    app.update(1, title="a new title")  # text and vector rewritten: the kept field stays
    _, logged, consistent = await _sync(config)
    payloads = await _payloads(config)
    assert payloads[1] == {"author": "ann", "tags": "curated", "published": 2020}
    assert payloads[2]["author"] == ("src-carl" if tie == "source" else "sink-bob")
    assert payloads[3] == {"author": "src-dora", "tags": "reviewed", "published": 2020}
    assert payloads[4] == payloads[5] == {"author": "ann", "tags": "a", "published": 2020}
    by_key = {c["key"]: c for c in logged}
    assert sorted(by_key) == ["1", "2", "3"] and len(logged) == 3  # each logged once
    assert by_key["1"]["resolution"] == "sink_kept"
    assert by_key["2"]["resolution"] == ("source_written" if tie == "source" else "sink_kept")
    assert by_key["2"]["fields"]["author"] == {
        "base": "ann",
        "source": "src-carl",
        "sink": "sink-bob",
        "result": "src-carl" if tie == "source" else "sink-bob",
    }
    assert consistent  # the check counts kept values as the sync does

    app.update(1, tags="from-source")  # the source moves a kept field: the source's again
    counts, logged_again, consistent = await _sync(config)
    assert (await _payloads(config))[1]["tags"] == "from-source"
    assert len(logged_again) == 3 and consistent
    counts, _, _ = await _sync(config)
    assert counts.get("payload_only", 0) == counts.get("upserted", 0) == 0


@pytest.mark.parametrize("sink", sorted(SINKS))
async def test_latest_wins_keeps_the_newer_side_by_its_timestamp(
    workdir: Path, app: App, sink: str
) -> None:
    _seed(app)
    policy = 'conflicts = "latest_wins"\nconflict_timestamp = "published"'
    config = _config(workdir, sink, policy)
    await _sync(config)
    await _edit(
        config,
        {
            1: {"author": "sink-x", "published": 2099},  # newer than the source
            2: {"author": "sink-y"},  # the timestamp not moved: the source's is newer
        },
    )
    app.update(1, tags="b")
    app.update(2, published=2021)
    _, logged, consistent = await _sync(config)
    payloads = await _payloads(config)
    assert payloads[1] == {"author": "sink-x", "tags": "a", "published": 2099}
    assert payloads[2] == {"author": "ann", "tags": "a", "published": 2021}
    assert {c["key"]: c["resolution"] for c in logged} == {
        "1": "sink_kept",
        "2": "source_written",
    }
    assert consistent


@pytest.mark.parametrize("sink", sorted(SINKS))
async def test_source_wins_reads_nothing_and_a_check_finds_and_repairs_edits(
    workdir: Path, app: App, sink: str
) -> None:
    _seed(app)
    config = _config(workdir, sink, "")
    reads = 0

    def counted(real: Sink) -> Sink:
        original = real.retrieve

        async def retrieve(*args: Any, **kwargs: Any) -> Any:
            nonlocal reads
            reads += 1
            return await original(*args, **kwargs)

        real.retrieve = retrieve  # type: ignore[method-assign]
        return real

    async def run() -> None:
        sink_ = counted(build_sink("vectors", config.sinks["vectors"], config))
        sinks = {"vectors": sink_}
        async with Engine.open(config, sinks=sinks, embedders={"default": HashEmbedder()}) as e:
            await e.run(once=True)

    await run()
    await _edit(config, {1: {"tags": "curated"}, 2: {"author": "sink-bob"}})
    app.update(2, author="src-carl")
    app.update(3, body="a new body")
    reads = 0
    await run()
    assert reads == 0  # the default policy reads nothing from the sink while syncing
    payloads = await _payloads(config)
    assert payloads[2]["author"] == "src-carl"  # overwritten by the record's write
    assert payloads[1]["tags"] == "curated"  # no change of record 1 yet
    async with Engine.open(config, embedders={"default": HashEmbedder()}) as engine:
        report = await engine.check("articles", mode="full")
        again = await engine.check("articles", mode="full")
        assert [d.key for d in report.drift if d.conflict] == [1]
        [open_] = await engine.state.conflicts(mapping="articles", status="open")
        assert (open_["key"], open_["detected"]) == ("1", "check")  # logged once
        await engine.repair(again)
        assert (await engine.check("articles", mode="full")).consistent
        assert await engine.state.conflicts(mapping="articles", status="open") == []
    assert (await _payloads(config))[1]["tags"] == "a"


async def test_write_back_carries_a_kept_sink_edit_to_the_source_once(
    workdir: Path, app: App
) -> None:
    _seed(app)
    config = _config(workdir, "qdrant-edge", 'conflicts = "merge"\nwrite_back = true')
    await _sync(config)
    await _edit(config, {1: {"tags": "curated"}})
    app.update(1, body="edited at the source too")
    counts, logged, consistent = await _sync(config)
    assert app.rows()[1]["tags"] == "curated"  # written back
    assert [c["key"] for c in logged] == ["1"] and consistent
    counts, logged, consistent = await _sync(config)  # the echo of our own write
    assert counts.get("payload_only", 0) == counts.get("upserted", 0) == 0
    assert len(logged) == 1 and consistent
    async with Engine.open(config, embedders={"default": HashEmbedder()}) as engine:
        assert await engine.state.kept("articles") == {}  # the source holds it now


async def test_a_manual_choice_the_api_the_cli_and_the_metric(workdir: Path, app: App) -> None:
    _seed(app)
    config = _config(workdir, "qdrant-edge", 'conflicts = "merge"')
    await _sync(config)
    await _edit(config, {2: {"author": "sink-bob"}})
    app.update(2, author="src-carl")  # both changed: the source's value wins the tie
    await _sync(config)
    assert (await _payloads(config))[2]["author"] == "src-carl"
    listed = cli("conflicts", "list", "--json", cwd=workdir)
    assert listed.returncode == 0, listed.stderr
    [c] = json.loads(listed.stdout)["conflicts"]
    assert (c["key"], c["resolution"], c["status"]) == ("2", "source_written", "resolved")
    done = cli("conflicts", "resolve", str(c["id"]), "--keep", "sink", cwd=workdir)
    assert done.returncode == 0, done.stderr
    _, logged, consistent = await _sync(config)
    assert (await _payloads(config))[2]["author"] == "sink-bob" and consistent
    assert [x["resolution"] for x in logged] == ["manual_sink"]
    async with Engine.open(config, embedders={"default": HashEmbedder()}) as engine:
        async with client(engine) as http:
            got = (await http.get("/api/conflicts?mapping=articles")).json()["conflicts"]
            text = (await http.get("/metrics")).text
        await engine.resolve_conflict(c["id"], "source")
        await engine.run(once=True)
        assert (await engine.check("articles", mode="full")).consistent
    assert [x["id"] for x in got] == [c["id"]]
    assert (
        metric(
            text,
            "vectorsync_conflicts_total",
            mapping="articles",
            policy="merge",
            resolution="manual_sink",
        )
        == 1.0
    )
    assert (await _payloads(config))[2]["author"] == "src-carl"


def test_write_back_killed_before_its_commit_still_reaches_the_source_once(
    workdir: Path, app: App
) -> None:
    _seed(app)
    config = _config(workdir, "qdrant-edge", 'conflicts = "merge"\nwrite_back = true')
    run = [sys.executable, "-m", "vectorsync", "run", "--once"]
    env = {k: v for k, v in os.environ.items() if k != "VECTORSYNC_FAILPOINT"}
    assert subprocess.run(run, cwd=workdir, env=env, timeout=300).returncode == 0
    asyncio.run(_edit(config, {1: {"tags": "curated"}}))
    app.update(1, body="edited at the source too")
    killed = subprocess.run(
        run,
        cwd=workdir,
        env={**env, "VECTORSYNC_FAILPOINT": "after_write_back"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "failpoint after_write_back fired" in killed.stderr
    assert app.rows()[1]["tags"] == "curated"  # written back; the batch never committed
    counts, _, consistent = asyncio.run(_sync(config))  # replays the batch
    assert consistent and (asyncio.run(_payloads(config)))[1]["tags"] == "curated"
    counts, _, consistent = asyncio.run(_sync(config))
    assert counts.get("payload_only", 0) == counts.get("upserted", 0) == 0 and consistent
    assert app.rows()[1]["tags"] == "curated"
