"""One mapping written to several sinks (qdrant-edge, Chroma, FalkorDB): each converges,
one that is down does not hold the others back and catches up when it is back, and a sink
added later is backfilled from the embedding cache."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import (
    App,
    assert_converged,
    check,
    load,
    streaming,
    sync_once,
    write_config,
)
from tests.tcp_proxy import TcpProxy, tcp_proxy
from vectorsync.embed.hash import HashEmbedder
from vectorsync.engine import Engine
from vectorsync.falkordb_server import FalkorDBServer

CHROMA = 'kind = "chroma"\npath = ".vectorsync/chroma"'


def _graph(url: str, graph: str) -> str:
    return f'kind = "falkordb"\nurl = "{url}"\ngraph = "sink_{graph}"'


@dataclass(frozen=True)
class CutOff:
    """The FalkorDB sink behind a proxy the test can cut."""

    proxy: TcpProxy
    toml: str


@pytest.fixture
def graph(falkordb: FalkorDBServer, graph_name: str) -> Iterator[CutOff]:
    with tcp_proxy(falkordb.url) as proxy:
        yield CutOff(proxy, _graph(proxy.url_for(falkordb.url), graph_name))


async def test_one_mapping_converges_in_three_sinks(
    workdir: Path, app: App, falkordb: FalkorDBServer, graph_name: str
) -> None:
    also = {"docs": CHROMA, "graph": _graph(falkordb.url, graph_name)}
    cfg = write_config(workdir, batch_size=37, also=also)
    assert [m.name for m in load(cfg).mappings] == ["articles", "articles.docs", "articles.graph"]
    rng = random.Random(11)
    app.random_ops(rng, 150)
    await sync_once(cfg)
    await check(cfg, app)  # each sink read directly, with the same point ids in each
    app.random_ops(rng, 300)
    await sync_once(cfg)
    await check(cfg, app)
    async with Engine.open(load(cfg)) as engine:
        for name in ("articles", "articles.docs", "articles.graph"):
            report = await engine.check(name)
            assert report.consistent, (name, report.counts)


async def test_run_once_with_a_sink_down_keeps_its_backlog_and_catches_up(
    workdir: Path, app: App, graph: CutOff
) -> None:
    proxy = graph.proxy
    cfg = write_config(workdir, also={"graph": graph.toml}, sync="sink_outage_after = 0.5")
    for k in range(1, 21):
        app.insert(k)
    embedder = HashEmbedder("default")
    async with Engine.open(load(cfg), embedders={"default": embedder}) as engine:
        await engine.run(once=True)
        proxy.cut()  # the graph goes down while the engine is up
        for k in range(21, 31):
            app.insert(k)
        app.update(3, body="changed while the graph is down")
        app.delete(4)
        app.update(5, author="zed")  # metadata only
        embedded = embedder.texts_embedded
        result = await engine.run(once=True)  # ends: the backlog stays for later
        assert result.counts["deferred"] == 13
        assert await engine.state.backlog_counts() == {"articles.graph": 13}
        status = {s.mapping: s for s in await engine.status()}
        assert status["articles.graph"].backlog == 13 and status["articles"].backlog == 0
        assert embedder.texts_embedded - embedded == 11  # the live sink's own texts
        assert await _all_in(engine, app, ("vectors",))
        proxy.restore()
        embedded = embedder.texts_embedded
        await engine.run(once=True)
        assert await engine.state.backlog_counts() == {}
        assert embedder.texts_embedded == embedded, "caught-up texts come from the cache"
    await check(cfg, app)


async def test_a_sink_down_at_start_starts_behind_and_catches_up(
    workdir: Path, app: App, graph: CutOff
) -> None:
    proxy = graph.proxy
    cfg = write_config(workdir, also={"graph": graph.toml}, sync="sink_outage_after = 0.5")
    for k in range(1, 11):
        app.insert(k)
    await sync_once(cfg)
    proxy.cut()
    app.update(1, body="while the graph was down")
    app.insert(11)
    async with Engine.open(load(cfg)) as engine:
        await engine.run(once=True)  # starts: the graph's copy waits behind
        assert await engine.state.backlog_counts() == {"articles.graph": 2}
        assert await _all_in(engine, app, ("vectors",))
    proxy.restore()
    await sync_once(cfg)
    async with Engine.open(load(cfg)) as engine:
        assert await engine.state.backlog_counts() == {}
    await check(cfg, app)
    proxy.cut()  # down at start again, and back while the engine streams
    app.delete(2)
    app.update(3, author="zed")
    async with Engine.open(load(cfg)) as engine, streaming(engine):
        await _until(_backlog_is(engine, {"articles.graph": 2}))
        proxy.restore()
        await _until(_backlog_is(engine, {}))
    await check(cfg, app)


async def test_a_sink_down_under_load_does_not_hold_the_others_back(
    workdir: Path, app: App, graph: CutOff
) -> None:
    """Streaming: while FalkorDB is unreachable, the other two sinks take every change
    (each waited for with a deadline, never a sleep); when it is back, it catches up and
    every sink equals the source, nothing lost."""
    proxy = graph.proxy
    also = {"docs": CHROMA, "graph": graph.toml}
    cfg = write_config(workdir, batch_size=50, also=also, sync="sink_outage_after = 0.5")
    for k in range(1, 101):
        app.insert(k)
    async with Engine.open(load(cfg)) as engine:
        await engine.prepare()  # collections and aliases made before they are read
        async with streaming(engine):
            await _until(lambda: _all_in(engine, app, ("vectors", "docs", "graph")))
            proxy.cut()
            rng = random.Random(3)
            for _ in range(3):  # rounds of changes while the graph is down
                app.random_ops(rng, 60)
                await _until(lambda: _all_in(engine, app, ("vectors", "docs")))
            backlog = await engine.state.backlog_counts()
            assert backlog.get("articles.graph", 0) > 0
            proxy.restore()
            await _until(lambda: _all_in(engine, app, ("vectors", "docs", "graph")))
            await _until(_backlog_is(engine, {}))
    await check(cfg, app)


async def test_a_sink_added_later_is_backfilled_from_the_embedding_cache(
    workdir: Path, app: App
) -> None:
    for k in range(1, 41):
        app.insert(k)
    embedder = HashEmbedder("default")
    cfg = write_config(workdir)
    await sync_once(cfg, embedder)
    cfg = write_config(workdir, also={"docs": CHROMA})  # a second sink for the mapping
    app.update(2, body="a live change beside the backfill")
    embedded = embedder.texts_embedded
    counts = await sync_once(cfg, embedder)
    assert embedder.texts_embedded - embedded == 1, counts  # only the changed text
    await check(cfg, app)


async def _all_in(engine: Engine, app: App, sinks: tuple[str, ...]) -> bool:
    """Each of ``sinks`` equals the app's rows (ids, payloads, vectors), read through the
    running engine's own sink connections."""
    config = engine.config
    for m in config.mappings:
        if m.sink in sinks:
            try:
                await assert_converged(config, app, engine.sinks[m.sink], m)
            except AssertionError:
                return False
    return True


def _backlog_is(engine: Engine, want: dict[str, int]) -> Callable[[], Awaitable[bool]]:
    async def condition() -> bool:
        return await engine.state.backlog_counts() == want

    return condition


async def _until(condition: Callable[[], Awaitable[bool]], deadline: float = 120.0) -> None:
    end = time.monotonic() + deadline
    while not await condition():
        if time.monotonic() > end:
            raise TimeoutError("condition not met before the deadline")
        await asyncio.sleep(0.05)


async def test_one_mapping_to_vectors_and_a_graph_with_its_relationships(
    workdir: Path, app: App, falkordb: FalkorDBServer, graph_name: str
) -> None:
    """Seed 003's flow: the rows as points in qdrant-edge and as nodes in FalkorDB, each
    node linked to its author's node; an edit of the author moves the edge, a delete takes
    it along — read back through FalkorDB's own client."""
    from falkordb import FalkorDB

    edge = (
        '[[mappings.edges]]\ntype = "WRITTEN_BY"\nfield = "author"\nlabel = "Author"\nkey = "name"'
    )
    cfg = write_config(
        workdir, also={"graph": _graph(falkordb.url, graph_name)}, extra_mapping=edge
    )
    for k in range(1, 7):
        app.insert(k, author="ann" if k % 2 else "bob")
    await sync_once(cfg)
    client = FalkorDB.from_url(falkordb.url)

    def edges() -> set[tuple[int, str]]:
        rows = client.select_graph(f"sink_{graph_name}").ro_query(
            "MATCH (a)-[:WRITTEN_BY]->(t:Author) RETURN a._vs_key, t.name"  # any version label
        )
        return {(k, name) for k, name in rows.result_set}

    assert edges() == {(k, "ann" if k % 2 else "bob") for k in range(1, 7)}
    app.update(1, author="cy")
    app.delete(2)
    await sync_once(cfg)
    assert edges() == {(1, "cy"), (3, "ann"), (4, "bob"), (5, "ann"), (6, "bob")}
    await check(cfg, app)
