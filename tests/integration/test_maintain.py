"""`vectorsync maintain` and the collection sizes of /metrics against the real stores:
qdrant-edge's optimize(), pgvector's VACUUM (ANALYZE) (seen in PostgreSQL's statistics),
FalkorDB's rebuild of a worn vector index (seen through FalkorDB's own client), and Chroma,
which keeps house by itself."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from falkordb import FalkorDB

from tests.e2e.test_cli import cli
from tests.helpers import App, load, sync_once, write_config
from tests.pgvector_server import PgvectorServer
from vectorsync.engine import Engine
from vectorsync.falkordb_server import FalkorDBServer
from vectorsync.server import create_app


def _yielded(server: FalkorDBServer, graph: str, label: str, k: int) -> int:
    """How many nodes FalkorDB's vector index yields when asked for ``k``."""
    client = FalkorDB.from_url(server.url)
    try:
        rows = (
            client.select_graph(graph)
            .ro_query(
                f"MATCH (p:`{label}`) WITH p LIMIT 1 CALL db.idx.vector.queryNodes("
                f"'{label}', '_vs_vector', $k, p._vs_vector) YIELD node RETURN count(node)",
                {"k": k},
            )
            .result_set
        )
        return int(rows[0][0])
    finally:
        client.close()


async def test_falkordb_rebuilds_a_worn_vector_index(
    workdir: Path, app: App, falkordb: FalkorDBServer, graph_name: str
) -> None:
    for k in range(1, 41):
        app.insert(k)
    sink = f'kind = "falkordb"\nurl = "{falkordb.url}"\ngraph = "{graph_name}"'
    cfg = write_config(workdir, sink=sink)
    await sync_once(cfg)
    for k in range(1, 41):
        app.update(k, author="bob")  # a payload-only update rewrites every node
    await sync_once(cfg)
    async with Engine.open(load(cfg)) as engine:
        [row] = await engine.maintain()
        label = row["collection"]
        assert row["kind"] == "falkordb" and label.startswith("articles")
        [done] = row["actions"]
        assert done.startswith(f"rebuilt the vector index of {label!r} (it yielded ")
        assert _yielded(falkordb, graph_name, label, 40) == 40  # whole again
        [again] = await engine.maintain("articles")
        assert again["actions"] == []  # nothing to do now
        hits = await engine.search("articles", "title 7", limit=5)
        assert len(hits) == 5
    shown = cli("maintain", "--json", cwd=workdir)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["maintained"][0]["actions"] == []
    table = cli("maintain", cwd=workdir)
    assert "nothing to do" in table.stdout


async def test_pgvector_vacuums_and_reports_its_size(
    workdir: Path, app: App, pgvector: PgvectorServer, pgvector_schema: str
) -> None:
    for k in range(1, 31):
        app.insert(k)
    sink = f'kind = "pgvector"\nurl = "{pgvector.url}"\nschema_name = "{pgvector_schema}"'
    cfg = write_config(workdir, sink=sink)
    await sync_once(cfg)
    async with Engine.open(load(cfg)) as engine:
        [row] = await engine.maintain()
        table = row["collection"]
        assert row["actions"] == [f"VACUUM (ANALYZE) {pgvector_schema}.{table}"]
        assert row["size_after"] > 0
        metrics = await _metrics(engine)
    with pgvector.admin() as conn:
        vacuumed = conn.execute(
            "SELECT last_vacuum IS NOT NULL, last_analyze IS NOT NULL FROM pg_stat_user_tables "
            "WHERE schemaname = %s AND relname = %s",
            (pgvector_schema, table),
        ).fetchone()
    assert vacuumed == (True, True)
    assert (
        f'vectorsync_collection_size_bytes{{mapping="articles"}} {row["size_after"]}.0' in metrics
    )


async def test_edge_optimizes_and_chroma_keeps_house_by_itself(workdir: Path, app: App) -> None:
    for k in range(1, 21):
        app.insert(k)
    cfg = write_config(workdir)  # qdrant-edge
    await sync_once(cfg)
    async with Engine.open(load(cfg)) as engine:
        [row] = await engine.maintain()
        assert row["kind"] == "qdrant-edge" and isinstance(row["actions"], list)
        assert all(a.startswith("optimize(): ") for a in row["actions"])
        assert row["size_before"] > 0 and row["size_after"] > 0
        assert await engine.search("articles", "title 3", limit=3)
        metrics = await _metrics(engine)
    assert 'vectorsync_collection_size_bytes{mapping="articles"}' in metrics

    chroma = write_config(workdir, sink='kind = "chroma"\npath = ".vectorsync/chroma"')
    await sync_once(chroma)
    async with Engine.open(load(chroma)) as engine:
        [row] = await engine.maintain()
    assert row["kind"] == "chroma" and row["actions"] is None and row["size_after"] is None
    shown = cli("maintain", cwd=workdir)
    assert shown.returncode == 0 and "chroma keeps house by itself" in shown.stdout


async def _metrics(engine: Engine) -> str:
    transport = httpx.ASGITransport(app=create_app(engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8787") as http:
        return (await http.get("/metrics")).text
