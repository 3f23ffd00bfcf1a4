"""Neo4j (polling, the same Cypher as FalkorDB). No Neo4j server can be installed on the
machine this project is built on: these tests run only when NEO4J_URI (and optionally
NEO4J_USER, NEO4J_PASSWORD) point at one. They use labels of their own and remove them."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import read_sink
from vectorsync.config import load_config
from vectorsync.engine import Engine
from vectorsync.model import point_id
from vectorsync.sinks.qdrant_edge import QdrantEdgeSink

URI = os.environ.get("NEO4J_URI")
pytestmark = pytest.mark.skipif(URI is None, reason="set NEO4J_URI to run against Neo4j")

CONFIG = """
[sources.kg]
kind = "neo4j"
url = "{uri}"
user = "{user}"
password = "{password}"
poll_grace = 0
[sinks.vectors]
kind = "qdrant-edge"
[embedders.default]
kind = "hash"
[[mappings]]
name = "chunks"
source = "kg"
match = "(c:{chunk})"
text = "{{{{ text }}}}"
payload = ["doc_title"]
sink = "vectors"
[[mappings.related]]
name = "document"
pattern = "(d:{doc})-[:HAS_CHUNK]->(c)"
fields = {{ doc_title = "d.title" }}
"""


@pytest.fixture
def neo4j() -> Iterator[tuple[Any, str, str]]:
    from neo4j import GraphDatabase

    auth = (os.environ.get("NEO4J_USER", "neo4j"), os.environ.get("NEO4J_PASSWORD", ""))
    driver = GraphDatabase.driver(URI, auth=auth)
    suffix = uuid.uuid4().hex[:8]
    chunk, doc = f"Chunk{suffix}", f"Doc{suffix}"
    try:
        yield driver, chunk, doc
    finally:
        driver.execute_query(f"MATCH (n) WHERE n:{chunk} OR n:{doc} DETACH DELETE n")
        driver.execute_query("MATCH (r:VectorsyncCapture {source: 'kg'}) DELETE r")
        driver.close()


async def test_neo4j_poll_sync_with_related_fields(
    workdir: Path, neo4j: tuple[Any, str, str]
) -> None:
    driver, chunk, doc = neo4j
    driver.execute_query(
        f"CREATE (d:{doc} {{id: 1, title: 'T', updated_at: timestamp()}}) "
        f"WITH d UNWIND range(1, 20) AS i "
        f"CREATE (d)-[:HAS_CHUNK]->(:{chunk} {{id: i, text: 'chunk ' + toString(i), "
        "updated_at: timestamp()})"
    )
    (workdir / "vectorsync.toml").write_text(
        CONFIG.format(
            uri=URI,
            user=os.environ.get("NEO4J_USER", "neo4j"),
            password=os.environ.get("NEO4J_PASSWORD", ""),
            chunk=chunk,
            doc=doc,
        )
    )
    config = load_config(workdir / "vectorsync.toml")
    async with Engine.open(config) as engine:
        await engine.run(once=True)
        driver.execute_query(
            f"MATCH (d:{doc} {{id: 1}}) SET d.title = 'U', d.updated_at = timestamp()"
        )
        result = await engine.run(once=True)
        assert result.counts.get("payload_only") == 20
    sink = QdrantEdgeSink("read", workdir / ".vectorsync" / "qdrant")
    await sink.open()
    points = await read_sink(sink, "chunks")
    await sink.close()
    assert {p.payload["doc_title"] for p in points.values()} == {"U"}
    assert set(points) == {point_id("chunks", i) for i in range(1, 21)}
