"""Relationships of the graph sinks (``[[mappings.edges]]``) against the real store: edges
made from payload fields' keys, moved when a key changes, removed with their node, and
never doubled by a replayed batch; read back with the store's own client. The sink tests
run on FalkorDB and, where ``NEO4J_URI`` names a server, on Neo4j (the same Cypher)."""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from falkordb import FalkorDB

from tests.helpers import sync_once
from vectorsync.config import parse_config
from vectorsync.errors import ConfigError
from vectorsync.falkordb_server import FalkorDBServer
from vectorsync.model import PayloadUpdate, Point, point_id
from vectorsync.sinks._graph_edges import EdgeSpec, edge_specs
from vectorsync.sinks._graph_sink import GraphSink
from vectorsync.sinks.base import CollectionSpec

DIM = 8
NEO4J_URI = os.environ.get("NEO4J_URI")
Edges = dict[tuple[str, Any, Any], int]  # (type, source key, target key) -> how many
Reader = Callable[[str], list[list[Any]]]  # Cypher -> rows, through the store's own client


def _vector(k: int) -> list[float]:
    return [float(k % 7 + 1)] + [float((k * (i + 3)) % 5 + 1) for i in range(DIM - 1)]


def _point(collection: str, key: int, **payload: Any) -> Point:
    return Point(
        id=point_id(collection, key), vector=_vector(key), payload={"_vs_key": key, **payload}
    )


class Graph:
    """A graph sink with edges declared, and a reader that is the store's own client."""

    def __init__(self, sink: GraphSink, read: Reader, suffix: str) -> None:
        self.sink, self.read = sink, read
        self.articles, self.authors, self.tag = (
            f"articles_{suffix}",
            f"authors_{suffix}",
            f"Tag_{suffix}",
        )

    def edges(self, rel: str | None = None) -> Edges:
        found: Edges = {}
        rows = self.read(
            f"MATCH (a:`{self.articles}`)-[e]->(t) "
            "RETURN type(e), a._vs_key, coalesce(t._vs_key, t.id)"
        )
        for kind, source, target in rows:
            if rel is None or kind == rel:
                found[(kind, source, target)] = found.get((kind, source, target), 0) + 1
        return found

    def tags(self) -> list[Any]:
        return sorted(r[0] for r in self.read(f"MATCH (t:`{self.tag}`) RETURN t.id"))


def _specs(g: Graph) -> tuple[EdgeSpec, ...]:
    return (
        EdgeSpec(source=g.articles, type="WRITTEN_BY", field="author_id", to=g.authors),
        EdgeSpec(
            source=g.articles, type="TAGGED", field="tag_ids", label=g.tag, key="id", many=True
        ),
    )


async def _falkordb(server: FalkorDBServer, graph: str) -> AsyncIterator[Graph]:
    from vectorsync.sinks.falkordb import FalkorDBSink

    client = FalkorDB.from_url(server.url)
    suffix = uuid.uuid4().hex[:6]

    def read(query: str) -> list[list[Any]]:
        return list(client.select_graph(graph).ro_query(query).result_set)

    g = Graph(FalkorDBSink("graph", server.url, graph=graph), read, suffix)
    g.sink.edges = _specs(g)
    try:
        yield g
    finally:
        await g.sink.close()
        client.close()


async def _neo4j() -> AsyncIterator[Graph]:
    from neo4j import GraphDatabase

    from vectorsync.sinks.neo4j import Neo4jSink

    assert NEO4J_URI is not None
    user, password = os.environ.get("NEO4J_USER", "neo4j"), os.environ.get("NEO4J_PASSWORD", "")
    driver = GraphDatabase.driver(NEO4J_URI, auth=(user, password))
    suffix = uuid.uuid4().hex[:6]

    def read(query: str) -> list[list[Any]]:
        return [list(r.values()) for r in driver.execute_query(query).records]

    g = Graph(Neo4jSink("graph", NEO4J_URI, user=user, password=password), read, suffix)
    g.sink.edges = _specs(g)
    try:
        yield g
    finally:
        for collection in (g.articles, g.authors):
            await g.sink.drop_collection(collection)
        driver.execute_query(f"MATCH (n:`{g.tag}`) DETACH DELETE n")
        await g.sink.close()
        driver.close()


@pytest.fixture(params=["falkordb", "neo4j"])
async def graph(request: pytest.FixtureRequest, graph_name: str) -> AsyncIterator[Graph]:
    if request.param == "neo4j":
        if NEO4J_URI is None:
            pytest.skip("set NEO4J_URI to run against Neo4j")
        async for g in _neo4j():
            yield g
        return
    server: FalkorDBServer = request.getfixturevalue("falkordb")
    async for g in _falkordb(server, graph_name):
        yield g


async def _ensure(g: Graph, *names: str) -> None:
    await g.sink.open()
    for name in names:
        await g.sink.ensure_collection(
            CollectionSpec(
                name=name, dimension=DIM, distance="cosine", indexes={"_vs_key": "integer"}
            )
        )


async def test_edges_follow_keys_and_a_replay_doubles_none(graph: Graph) -> None:
    g = graph
    await _ensure(g, g.articles)  # the authors are not there yet: articles come first
    articles = [
        _point(g.articles, 1, author_id=10, tag_ids=["x", "y"]),
        _point(g.articles, 2, author_id=20, tag_ids=[]),
        _point(g.articles, 3, author_id=None, tag_ids=["y"]),
    ]
    await g.sink.upsert(g.articles, articles)
    assert g.edges("WRITTEN_BY") == {}  # nothing to point at yet
    assert g.tags() == ["x", "y"]  # targets of a label of the user's are merged by key

    await _ensure(g, g.authors)
    authors = [_point(g.authors, k, name=f"author {k}") for k in (10, 20, 30)]
    await g.sink.upsert(g.authors, authors)  # the nodes already naming them link back
    want = {
        ("WRITTEN_BY", 1, 10): 1,
        ("WRITTEN_BY", 2, 20): 1,
        ("TAGGED", 1, "x"): 1,
        ("TAGGED", 1, "y"): 1,
        ("TAGGED", 3, "y"): 1,
    }
    assert g.edges() == want

    # a replay (the same batches again, in either order) leaves one edge each
    await g.sink.upsert(g.articles, articles)
    await g.sink.upsert(g.authors, authors)
    await g.sink.upsert(g.articles, articles + articles[:1])
    assert g.edges() == want

    # a changed key moves the edge: a rewritten point, and a payload-only update
    await g.sink.upsert(g.articles, [_point(g.articles, 1, author_id=30, tag_ids=["y", "z"])])
    moved = _point(g.articles, 2, author_id=10, tag_ids=["x"])
    update = PayloadUpdate(
        id=moved.id, set={"author_id": 10, "tag_ids": ["x"]}, payload=moved.payload
    )
    for _ in range(2):  # replayed too
        assert await g.sink.update_payloads(g.articles, [update]) == []
    after = {
        ("WRITTEN_BY", 1, 30): 1,
        ("WRITTEN_BY", 2, 10): 1,
        ("TAGGED", 1, "y"): 1,
        ("TAGGED", 1, "z"): 1,
        ("TAGGED", 2, "x"): 1,
        ("TAGGED", 3, "y"): 1,
    }
    assert g.edges() == after

    # a field removed from a payload removes its edges
    gone = _point(g.articles, 3, author_id=20)
    unset = PayloadUpdate(
        id=gone.id, set={"author_id": 20}, unset=("tag_ids",), payload=gone.payload
    )
    await g.sink.update_payloads(g.articles, [unset])
    after = {k: v for k, v in after.items() if k != ("TAGGED", 3, "y")} | {("WRITTEN_BY", 3, 20): 1}
    assert g.edges() == after

    # a deleted article takes its edges along; a deleted author its incoming ones, and
    # they come back with it
    await g.sink.delete(g.articles, [point_id(g.articles, 1)])
    await g.sink.delete(g.authors, [point_id(g.authors, 10)])
    assert g.edges() == {("WRITTEN_BY", 3, 20): 1, ("TAGGED", 2, "x"): 1}
    await g.sink.upsert(g.authors, [_point(g.authors, 10, name="back")])
    assert g.edges() == {("WRITTEN_BY", 3, 20): 1, ("WRITTEN_BY", 2, 10): 1, ("TAGGED", 2, "x"): 1}
    assert g.tags() == ["x", "y", "z"]  # the user's nodes stay


async def test_edges_through_the_engine_from_a_related_field(
    workdir: Path, falkordb: FalkorDBServer, graph_name: str
) -> None:
    """SQLite → FalkorDB: articles name their author by a foreign key and carry the
    author's name as a related field; both mappings go to one graph sink."""
    db = sqlite3.connect(workdir / "app.db", isolation_level=None)
    db.execute("CREATE TABLE authors (id INTEGER PRIMARY KEY, name TEXT)")
    db.execute("CREATE TABLE articles (id INTEGER PRIMARY KEY, title TEXT, author_id INTEGER)")
    for a in (1, 2):
        db.execute("INSERT INTO authors VALUES (?, ?)", (a, f"author {a}"))
    for k in range(1, 7):
        db.execute("INSERT INTO articles VALUES (?, ?, ?)", (k, f"title {k}", 1 + k % 2))
    cfg = workdir / "vectorsync.toml"
    cfg.write_text(_engine_config(falkordb, graph_name))
    await sync_once(cfg)

    client = FalkorDB.from_url(falkordb.url)

    def query(cypher: str) -> list[list[Any]]:
        return list(client.select_graph(graph_name).ro_query(cypher).result_set)

    def written_by() -> dict[int, list[Any]]:
        # the mappings' collections are aliases of their first index versions
        articles, authors = (_live(query, name) for name in ("articles", "authors"))
        rows = query(
            f"MATCH (a:`{articles}`) OPTIONAL MATCH (a)-[:WRITTEN_BY]->(t:`{authors}`) "
            "RETURN a._vs_key, collect(t.name) ORDER BY a._vs_key"
        )
        return {int(k): sorted(names) for k, names in rows}

    try:
        assert written_by() == {k: [f"author {1 + k % 2}"] for k in range(1, 7)}
        db.execute("UPDATE articles SET author_id = 1 WHERE id = 1")  # a moved foreign key
        db.execute("UPDATE articles SET author_id = NULL WHERE id = 2")  # no author
        db.execute("DELETE FROM articles WHERE id = 3")
        db.execute("UPDATE authors SET name = 'renamed' WHERE id = 1")  # the target changes
        await sync_once(cfg)
        want = {1: ["renamed"], 2: [], 4: ["renamed"], 5: ["author 2"], 6: ["renamed"]}
        assert written_by() == want
        assert query("MATCH ()-[e:WRITTEN_BY]->() RETURN count(e)") == [[4]]
    finally:
        client.close()
        db.close()


def _live(query: Reader, name: str) -> str:
    """The label of the collection ``name`` names, as a Cypher reader resolves it."""
    rows = query(
        f"OPTIONAL MATCH (a:VectorsyncAlias {{name: '{name}'}}) "
        f"RETURN coalesce(a.collection, '{name}')"
    )
    return str(rows[0][0])


def _engine_config(server: FalkorDBServer, graph: str) -> str:
    return f"""
[state]
url = "sqlite:///.vectorsync/state.db"
[sources.app]
kind = "sqlite"
path = "app.db"
[sinks.graph]
kind = "falkordb"
url = "{server.url}"
graph = "{graph}"
[embedders.default]
kind = "hash"
dimension = 16

[[mappings]]
name = "articles"
source = "app"
table = "articles"
text = "{{{{ title }}}} by {{{{ author }}}}"
payload = ["author_id", "author"]
sink = "graph"
[[mappings.related]]
name = "writer"
table = "authors"
on = {{ id = "author_id" }}
fields = {{ author = "name" }}
[[mappings.edges]]
type = "WRITTEN_BY"
field = "author_id"
to = "authors"

[[mappings]]
name = "authors"
source = "app"
table = "authors"
text = "{{{{ name }}}}"
payload = ["name"]
sink = "graph"
"""


def _config(edges: str, sink: str = 'kind = "falkordb"') -> dict[str, Any]:
    import tomllib

    text = f"""
[sources.app]
kind = "sqlite"
path = "app.db"
[sinks.graph]
{sink}
[sinks.other]
kind = "falkordb"
[embedders.default]
kind = "hash"
[[mappings]]
name = "articles"
source = "app"
table = "articles"
text = "{{{{ title }}}}"
payload = ["author_id", "tag_ids"]
sink = "graph"
[[mappings.related]]
name = "tags"
table = "tags"
on = {{ article_id = "id" }}
fields = {{ tag_ids = "id" }}
many = true
{edges}
[[mappings]]
name = "authors"
source = "app"
table = "authors"
text = "{{{{ name }}}}"
sink = "graph"
collection = "writers"
[[mappings]]
name = "elsewhere"
source = "app"
table = "authors"
text = "{{{{ name }}}}"
sink = "other"
"""
    return tomllib.loads(text)


def test_edge_declarations_become_sink_specs() -> None:
    config = parse_config(
        _config(
            '[[mappings.edges]]\ntype = "WRITTEN_BY"\nfield = "author_id"\nto = "authors"\n'
            '[[mappings.edges]]\ntype = "TAGGED"\nfield = "tag_ids"\nlabel = "Tag"\n'
        )
    )
    assert edge_specs(config, "graph") == (
        EdgeSpec(source="articles", type="WRITTEN_BY", field="author_id", to="writers"),
        EdgeSpec(
            source="articles", type="TAGGED", field="tag_ids", label="Tag", key="id", many=True
        ),
    )
    assert edge_specs(config, "other") == ()


@pytest.mark.parametrize(
    ("edges", "sink", "message"),
    [
        ('type = "W"\nfield = "title"\nto = "authors"', None, "'title' is not in payload"),
        ('type = "W"\nfield = "author_id"', None, "set either to"),
        ('type = "W"\nfield = "author_id"\nto = "authors"\nlabel = "A"', None, "not both"),
        ('type = "W"\nfield = "author_id"\nto = "nobody"', None, "not a mapping written to"),
        ('type = "W"\nfield = "author_id"\nto = "elsewhere"', None, "not a mapping written to"),
        ('type = "W"\nfield = "author_id"\nlabel = "writers"', None, "use to = <its mapping>"),
        ('type = "W"\nfield = "author_id"\nlabel = "VectorsyncAlias"', None, "vectorsync's own"),
        ('type = "W-1"\nfield = "author_id"\nto = "authors"', None, "type"),
        (
            'type = "W"\nfield = "author_id"\nto = "authors"',
            'kind = "qdrant-edge"',
            "not a graph sink",
        ),
    ],
)
def test_edge_declarations_are_checked(edges: str, sink: str | None, message: str) -> None:
    data = _config(f"[[mappings.edges]]\n{edges}\n", sink or 'kind = "falkordb"')
    with pytest.raises(ConfigError, match=message):
        parse_config(data)
