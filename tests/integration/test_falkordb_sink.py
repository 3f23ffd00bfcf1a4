"""The FalkorDB sink against a real FalkorDB server: SQLite → FalkorDB through the CLI
(``run --once``, edits, deletes, a payload field dropped from the mapping, ``check --mode
full``, ``search``), verified by reading the graph with FalkorDB's own client; and what only
the graph sink does (its property mapping, Cypher readers of its nodes, refusals)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from falkordb import FalkorDB

from tests.e2e.test_cli import cli
from tests.helpers import App, load, sync_once, write_config
from vectorsync.embed.hash import HashEmbedder
from vectorsync.errors import PermanentError, SinkError
from vectorsync.falkordb_server import FalkorDBServer, free_port
from vectorsync.model import Condition, PayloadUpdate, Point, point_id
from vectorsync.render import Renderer
from vectorsync.sinks.base import CollectionSpec
from vectorsync.sinks.falkordb import FalkorDBSink


def _sink_toml(server: FalkorDBServer, graph: str) -> str:
    return f'kind = "falkordb"\nurl = "{server.url}"\ngraph = "{graph}"'


def _nodes(server: FalkorDBServer, graph: str, label: str = "articles") -> dict[str, Any]:
    """The nodes of a collection (through its alias, if it is one) as FalkorDB's own
    client reads them: id -> properties."""
    client = FalkorDB.from_url(server.url)
    try:
        g = client.select_graph(graph)
        rows = g.ro_query(f"MATCH (n:`{_live(g, label)}`) RETURN n").result_set
        return {r[0].properties["_vs_id"]: dict(r[0].properties) for r in rows}
    finally:
        client.close()


def _live(g: Any, name: str) -> str:
    """The label of the collection ``name`` names: what a Cypher reader resolves."""
    return str(
        g.ro_query(
            "OPTIONAL MATCH (a:VectorsyncAlias {name: $name}) RETURN coalesce(a.collection, $name)",
            {"name": name},
        ).result_set[0][0]
    )


def _assert_in_graph(server: FalkorDBServer, graph: str, app: App, cfg: Path) -> None:
    """One node per live row, with its current payload as plain properties (NULL columns
    as JSON "null", listed in _vs_json) and its current text's vector."""
    mapping = load(cfg).mappings[0]
    renderer, embedder = Renderer(mapping), HashEmbedder()
    nodes = _nodes(server, graph)
    rows = app.rows()
    assert sorted(nodes) == sorted(point_id(mapping.name, k) for k in rows)
    for key, row in rows.items():
        props = nodes[point_id(mapping.name, key)]
        rendered = renderer.render(row)
        nulls = sorted(k for k, v in rendered.payload.items() if v is None)
        assert {k: props[k] for k in rendered.payload if k not in nulls} == {
            k: v for k, v in rendered.payload.items() if v is not None
        }
        assert sorted(props.get("_vs_json") or []) == nulls
        assert all(props[k] == "null" for k in nulls)
        assert props["_vs_key"] == key
        fields = set(mapping.payload) | {"_vs_id", "_vs_vector", "_vs_json"}
        assert {k for k in props if not k.startswith("_vs_")} <= fields  # none left behind
        want = embedder.vector(rendered.text)
        assert props["_vs_vector"] == pytest.approx(want, abs=1e-5), key


def test_sqlite_to_falkordb_through_the_cli(
    workdir: Path, app: App, falkordb: FalkorDBServer, graph_name: str
) -> None:
    for k in range(1, 31):
        app.insert(k, author=["ann", "bob"][k % 2], published=2000 + k)
    cfg = write_config(workdir, sink=_sink_toml(falkordb, graph_name), batch_size=8)
    done = cli("run", "--once", cwd=workdir)
    assert done.returncode == 0, done.stderr
    _assert_in_graph(falkordb, graph_name, app, cfg)

    app.update(3, title="a graph of its own")  # content
    app.update(4, author="cy", published=1999)  # payload only
    app.update(5, tags=None)  # a payload field becomes NULL
    app.delete(6)
    app.delete(7)
    app.insert(31, title="the newest")
    assert cli("run", "--once", cwd=workdir).returncode == 0
    _assert_in_graph(falkordb, graph_name, app, cfg)

    # a payload field dropped from the mapping is removed from every node
    cfg.write_text(cfg.read_text().replace('["author", "tags", "published"]', '["author"]'))
    assert cli("run", "--once", cwd=workdir).returncode == 0
    nodes = _nodes(falkordb, graph_name)
    assert not [n for n in nodes.values() if "tags" in n or "published" in n]
    assert not [n for n in nodes.values() if n.get("_vs_json")]  # tags of 5 was the only JSON
    _assert_in_graph(falkordb, graph_name, app, cfg)

    checked = cli("check", "--mode", "full", "--json", cwd=workdir)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    [entry] = json.loads(checked.stdout)["checks"]
    assert entry["before"]["consistent"] and entry["before"]["counts"]["missing"] == 0

    found = cli("search", "articles", "a graph of its own", "--json", cwd=workdir)
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)["hits"]
    assert hits[0]["key"] == 3  # its text is its title and its body: near, not equal
    ann = cli("search", "articles", "title 9", "--where", "author=bob", "--json", cwd=workdir)
    assert {h["key"] for h in json.loads(ann.stdout)["hits"]} <= {
        k for k, r in app.rows().items() if r["author"] == "bob"
    }


async def test_drift_made_in_cypher_is_found_and_repaired(
    workdir: Path, app: App, falkordb: FalkorDBServer, graph_name: str
) -> None:
    from vectorsync.engine import Engine

    for k in range(1, 21):
        app.insert(k)
    cfg = write_config(workdir, sink=_sink_toml(falkordb, graph_name))
    await sync_once(cfg)
    client = FalkorDB.from_url(falkordb.url)
    g = client.select_graph(graph_name)
    label = _live(g, "articles")
    g.query(  # an application editing the nodes behind vectorsync
        f"MATCH (n:`{label}`) WHERE n._vs_id IN $ids DELETE n",
        {"ids": [point_id("articles", k) for k in (1, 2)]},
    )
    g.query(
        f"MATCH (n:`{label}` {{_vs_id: $id}}) SET n.author = 'mallory'",
        {"id": point_id("articles", 5)},
    )
    client.close()
    async with Engine.open(load(cfg)) as engine:
        report = await engine.check("articles")
        assert set(report.keys("missing")) == {1, 2}
        assert set(report.keys("payload_mismatch")) == {5}
        await engine.repair(report)
        assert (await engine.check("articles")).consistent
    _assert_in_graph(falkordb, graph_name, app, cfg)


async def _open(server: FalkorDBServer, graph: str, spec: CollectionSpec) -> FalkorDBSink:
    sink = FalkorDBSink("graph", server.url, graph=graph)
    await sink.open()
    await sink.ensure_collection(spec)
    return sink


async def test_payloads_round_trip_and_cypher_readers_see_plain_properties(
    falkordb: FalkorDBServer, graph_name: str
) -> None:
    spec = CollectionSpec(name="my docs", dimension=3, distance="euclid", indexes={"n": "integer"})
    sink = await _open(falkordb, graph_name, spec)
    payload = {
        "n": 7,
        "f": 1.5,
        "ok": True,
        "s": "tëxt",
        "tags": ["a", "b"],
        "empty": [],
        "none": None,
        "obj": {"x": [1, {"y": None}]},
        "mixed": [1, "a"],
        "a key with spaces": 1,
    }
    try:
        await sink.upsert(
            "my docs", [Point(id=point_id("d", 1), vector=[3, 4, 0], payload=payload)]
        )
        [rec] = await sink.retrieve("my docs", [point_id("d", 1)], with_vectors=True)
        assert rec.payload == payload and rec.vector == [3.0, 4.0, 0.0]  # euclid: as given
        props = _nodes(falkordb, graph_name, "my docs")[point_id("d", 1)]
        assert props["tags"] == ["a", "b"] and props["n"] == 7 and props["empty"] == []
        assert props["obj"] == '{"x": [1, {"y": null}]}'
        assert sorted(props["_vs_json"]) == ["mixed", "none", "obj"]

        update = PayloadUpdate(id=point_id("d", 1), set={"n": {"now": "json"}}, unset=("obj",))
        assert await sink.update_payloads("my docs", [update]) == []
        [rec] = await sink.retrieve("my docs", [point_id("d", 1)])
        want = {k: v for k, v in payload.items() if k != "obj"} | {"n": {"now": "json"}}
        assert rec.payload == want
        [hit] = await sink.search("my docs", [0, 0, 0], limit=3)
        assert hit.score == pytest.approx(5.0)  # the Euclidean distance, as Qdrant gives

        big = Point(id=point_id("d", 2), vector=[1, 0, 0], payload={"n": 2**64})
        with pytest.raises(PermanentError, match=r"field 'n' holds 18446744073709551616"):
            await sink.upsert("my docs", [big])
        for key in ("_vs_vector", "a`b", ""):
            bad = Point(id=point_id("d", 3), vector=[1, 0, 0], payload={key: 1})
            with pytest.raises(PermanentError, match=f"'{key}' cannot be a node property"):
                await sink.upsert("my docs", [bad])
        short = Point(id=point_id("d", 4), vector=[1, 0], payload={})
        with pytest.raises(
            PermanentError, match="dimension 2; collection 'my docs' holds dimension 3"
        ):
            await sink.upsert("my docs", [short])
        assert await sink.count("my docs") == 1  # nothing of a refused batch was written
    finally:
        await sink.close()


async def test_a_selective_filter_still_fills_the_limit(
    falkordb: FalkorDBServer, graph_name: str
) -> None:
    import random

    rng = random.Random(3)
    spec = CollectionSpec(name="docs", dimension=8, distance="cosine", indexes={"t": "keyword"})
    sink = await _open(falkordb, graph_name, spec)
    points = [
        Point(
            id=point_id("docs", k),
            vector=[rng.gauss(0, 1) for _ in range(8)],
            payload={"t": "rare" if k % 100 == 0 else "common", "k": k},
        )
        for k in range(2000)
    ]
    try:
        await sink.upsert("docs", points)
        rare = [Condition(field="t", op="eq", value="rare")]
        hits = await sink.search("docs", points[500].vector, limit=15, where=rare)
        assert len(hits) == 15 and all(h.record.payload["t"] == "rare" for h in hits)
        assert hits[0].record.payload["k"] == 500 and hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    finally:
        await sink.close()


async def test_refusals_name_the_fix(falkordb: FalkorDBServer, graph_name: str) -> None:
    sink = FalkorDBSink("graph", falkordb.url, graph=graph_name)
    await sink.open()
    try:
        with pytest.raises(PermanentError, match="no dot product; use an embedder with cosine"):
            await sink.ensure_collection(CollectionSpec(name="d", dimension=4, distance="dot"))
        client = FalkorDB.from_url(falkordb.url)
        client.select_graph(graph_name).query("CREATE (:people {name: 'ann'})")
        client.close()
        with pytest.raises(
            PermanentError, match=r"nodes labelled 'people' exist .* not vectorsync's"
        ):
            await sink.ensure_collection(
                CollectionSpec(name="people", dimension=4, distance="cosine")
            )
        with pytest.raises(PermanentError, match="no collection 'nothing' in graph"):
            await sink.count("nothing")
        with pytest.raises(PermanentError, match="vectorsync's own"):
            await sink.ensure_collection(
                CollectionSpec(name="VectorsyncAlias", dimension=4, distance="cosine")
            )
    finally:
        await sink.close()


async def test_an_unreachable_server_is_retryable_and_a_problem_naming_it() -> None:
    url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}"
    sink = FalkorDBSink("gone", url)
    [problem] = await sink.problems()
    assert problem.startswith("sink 'gone': cannot reach FalkorDB at redis://:***@127.0.0.1:")
    assert "s3cret-pw" not in problem and "fix sinks.gone.url" in problem
    with pytest.raises(SinkError, match="cannot reach FalkorDB"):
        await sink.open()


async def test_search_fills_the_limit_after_nodes_were_rewritten(
    falkordb: FalkorDBServer, graph_name: str
) -> None:
    """FalkorDB's vector index keeps the entry a rewritten node replaced (until the index is
    rebuilt), and yields fewer than k nodes for it: the sink asks for more."""
    import random

    rng = random.Random(8)
    spec = CollectionSpec(name="docs", dimension=16, distance="cosine")
    sink = await _open(falkordb, graph_name, spec)
    points = [
        Point(id=point_id("docs", k), vector=[rng.gauss(0, 1) for _ in range(16)], payload={"k": k})
        for k in range(300)
    ]
    try:
        for _ in range(3):
            await sink.upsert("docs", points)  # each a rewrite of every node
        updates = [
            PayloadUpdate(id=p.id, set={"m": 1}, payload={**p.payload, "m": 1}) for p in points
        ]
        assert await sink.update_payloads("docs", updates) == []
        client = FalkorDB.from_url(falkordb.url)
        raw = client.select_graph(graph_name).ro_query(
            "CALL db.idx.vector.queryNodes('docs', '_vs_vector', 10, vecf32($q)) YIELD node "
            "RETURN count(node)",
            {"q": points[0].vector},
        )
        client.close()
        assert raw.result_set[0][0] < 10  # what the index gives for k = 10 now
        hits = await sink.search("docs", points[0].vector, limit=10)
        assert len(hits) == 10 and hits[0].record.id == points[0].id
        assert hits[0].record.payload == {"k": 0, "m": 1}
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    finally:
        await sink.close()


async def test_a_server_that_goes_away_is_an_outage_and_the_sink_reconnects() -> None:
    server = FalkorDBServer()
    server.start()
    sink = FalkorDBSink("lossy", server.url, graph="g", timeout=5)
    spec = CollectionSpec(name="docs", dimension=4, distance="cosine")
    point = Point(id=point_id("docs", 1), vector=[1, 0, 0, 0], payload={})
    try:
        await sink.open()
        await sink.ensure_collection(spec)
        await sink.upsert("docs", [point])
        server.stop()  # a crash or a network cut, as the sink sees it
        with pytest.raises(SinkError, match="sink 'lossy': "):
            await sink.upsert("docs", [point])
        [problem] = await sink.problems()
        assert problem.startswith("sink 'lossy': ") and "fix sinks.lossy.url" in problem
        server.start()  # back, empty (it keeps nothing on disk)
        assert await sink.problems() == []
        await sink.ensure_collection(spec)
        await sink.upsert("docs", [point])  # the same client, reconnected
        assert await sink.count("docs") == 1
    finally:
        await sink.close()
        server.destroy()
