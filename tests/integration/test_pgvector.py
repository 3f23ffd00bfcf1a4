"""The pgvector sink against real servers: a SQLite source synced through the engine into
PostgreSQL 18 + pgvector (read back with plain psycopg), and a PostgreSQL without pgvector
(the machine's PostgreSQL 15) refused with the fix named."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from psycopg import sql

from tests.helpers import App, assert_converged, load, sync_once, wait_for, write_config
from tests.pgserver import PASSWORD
from tests.pgvector_server import PgvectorServer
from vectorsync.config import parse_config
from vectorsync.embed.hash import HashEmbedder
from vectorsync.engine import Engine
from vectorsync.errors import ConfigError, PermanentError, SinkError
from vectorsync.model import Condition, PayloadUpdate, Point, point_id
from vectorsync.render import Renderer
from vectorsync.sinks.base import CollectionSpec, Distance
from vectorsync.sinks.pgvector import PgvectorSink
from vectorsync.sinks.qdrant import QdrantSink


def _sink_toml(server: PgvectorServer, schema: str) -> str:
    return f'kind = "pgvector"\nurl = "{server.url}"\nschema_name = "{schema}"'


def _table(server: PgvectorServer, schema: str, table: str) -> dict[str, dict[str, Any]]:
    """The collection's rows as plain psycopg reads them: id -> payload and vector."""
    with server.admin() as conn:
        rows = conn.execute(
            sql.SQL("SELECT id::text, payload, vector::text FROM {}").format(
                sql.Identifier(schema, table)
            )
        ).fetchall()
    return {str(i): {"payload": p, "vector": orjson.loads(v)} for i, p, v in rows}


def _assert_table_matches(server: PgvectorServer, schema: str, app: App, cfg: Path) -> None:
    mapping = load(cfg).mappings[0]
    renderer, embedder = Renderer(mapping), HashEmbedder()
    rows = _table(server, schema, mapping.collection_name)
    live = app.rows()
    assert sorted(rows) == sorted(point_id(mapping.name, k) for k in live)
    for key, row in live.items():
        stored = rows[point_id(mapping.name, key)]
        rendered = renderer.render(row)
        assert {k: stored["payload"][k] for k in rendered.payload} == rendered.payload
        assert stored["payload"]["_vs_key"] == key
        want = embedder.vector(rendered.text)  # unit length: cosine vectors stored normalised
        assert stored["vector"] == pytest.approx(want, abs=1e-6), key


async def test_sqlite_changes_converge_in_pgvector(
    workdir: Path, app: App, pgvector: PgvectorServer, pgvector_schema: str
) -> None:
    rng = random.Random(7)
    for k in range(1, 41):
        app.insert(k)
    cfg = write_config(workdir, sink=_sink_toml(pgvector, pgvector_schema), batch_size=16)
    embedder = HashEmbedder()
    counts = await sync_once(cfg, embedder)
    assert counts["upserted"] == 40
    _assert_table_matches(pgvector, pgvector_schema, app, cfg)
    before = _table(pgvector, pgvector_schema, "articles")

    for k in (3, 4, 5):
        app.update(k, author=f"author-{k}", published=1990 + k)  # payload only
    app.update(6, tags=None)
    app.update(8, title="a title of its own")  # content
    app.update(9, body="a new body")
    for k in (10, 11, 12):
        app.delete(k)
    app.insert(41)
    app.random_ops(rng, 60, keys=50)
    embedded = embedder.texts_embedded
    await sync_once(cfg, embedder)
    _assert_table_matches(pgvector, pgvector_schema, app, cfg)
    after = _table(pgvector, pgvector_schema, "articles")
    for k in (3, 4, 5):
        pid = point_id("articles", k)
        if (
            k in app.rows()
            and after[pid]["payload"]["_vs_text_hash"] == (before[pid]["payload"]["_vs_text_hash"])
        ):
            assert after[pid]["vector"] == before[pid]["vector"]
    assert embedder.texts_embedded > embedded  # the content changes were embedded

    # only metadata changes now: the embedder is not called, the vectors stay
    app.update(13, author="zed")
    app.update(14, published=1)
    embedded = embedder.texts_embedded
    counts = await sync_once(cfg, embedder)
    assert counts["payload_only"] == 2 and counts["upserted"] == 0
    assert embedder.texts_embedded == embedded
    final = _table(pgvector, pgvector_schema, "articles")
    for k in (13, 14):
        pid = point_id("articles", k)
        assert final[pid]["vector"] == after[pid]["vector"]
    _assert_table_matches(pgvector, pgvector_schema, app, cfg)

    sink = PgvectorSink("check", pgvector.url, schema=pgvector_schema)
    await sink.open()
    try:
        await assert_converged(load(cfg), app, sink)  # and through the sink port
    finally:
        await sink.close()


async def test_a_server_without_pgvector_is_refused_naming_the_fix(pg_url: str) -> None:
    sink = PgvectorSink("vectors", pg_url)  # PostgreSQL 15 here has no pgvector
    with pytest.raises(ConfigError) as caught:
        await sink.open()
    await sink.close()
    message = str(caught.value)
    assert "sink 'vectors'" in message and "no pgvector extension" in message
    assert message.endswith(
        'has no pgvector extension (extension "vector" is not available); install pgvector on '
        "that server (the postgresql-NN-pgvector package, or build it from source), or point "
        "sinks.vectors.url at a server that has it"
    )
    assert PASSWORD not in message and "***" in message  # the url is shown redacted
    with psycopg.connect(pg_url) as conn:  # nothing was left behind
        found = conn.execute("SELECT to_regnamespace('vectors')").fetchone()
    assert found == (None,)


def test_the_config_refuses_the_postgres_source_schema() -> None:
    base: dict[str, Any] = {
        "sources": {"app": {"kind": "sqlite", "path": "app.db"}},
        "embedders": {"default": {"kind": "hash"}},
        "mappings": [{"name": "a", "source": "app", "table": "a", "text": "x", "sink": "v"}],
    }
    sink = {"kind": "pgvector", "url": "postgresql://u@h/db", "schema_name": "vectorsync"}
    with pytest.raises(ConfigError, match=r"belongs to the PostgreSQL source.*vectors"):
        parse_config({**base, "sinks": {"v": sink}})
    with pytest.raises(ConfigError, match="postgresql://"):
        parse_config({**base, "sinks": {"v": {"kind": "pgvector", "url": "http://h"}}})
    ok = parse_config({**base, "sinks": {"v": {**sink, "schema_name": "vectors"}}})
    assert ok.sinks["v"].kind == "pgvector"


async def test_a_lost_connection_is_retryable_and_the_next_call_reconnects(
    pgvector: PgvectorServer, pgvector_schema: str
) -> None:
    sink = PgvectorSink("lossy", pgvector.url, schema=pgvector_schema)
    await sink.open()
    try:
        await sink.ensure_collection(CollectionSpec(name="docs", dimension=4, distance="cosine"))
        assert await sink.problems() == []
        assert await sink.count("docs") == 0  # reads have a connection of their own
        with pgvector.admin() as conn:  # what a server restart or a network cut does to them
            killed = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'vectorsync-lossy'"
            ).fetchall()
        assert killed == [(True,), (True,)]
        point = Point(id=point_id("docs", 1), vector=[1, 0, 0, 0], payload={})
        with pytest.raises(SinkError, match=r"sink 'lossy': .*terminating connection"):
            await sink.count("docs")
        with pytest.raises(SinkError, match=r"sink 'lossy': .*terminating connection"):
            await sink.upsert("docs", [point])
        await sink.upsert("docs", [point])  # reconnected
        assert await sink.count("docs") == 1
    finally:
        await sink.close()


async def test_an_unreachable_server_is_a_problem_naming_it(tmp_path: Path) -> None:
    url = f"postgresql://app:{PASSWORD}@/db?host={tmp_path}"  # no server on that socket
    sink = PgvectorSink("gone", url)
    [problem] = await sink.problems()
    assert problem.startswith("sink 'gone': cannot connect to postgresql://app:***@/db")
    assert PASSWORD not in problem
    with pytest.raises(SinkError, match="cannot connect"):
        await sink.open()


async def test_a_template_change_reindexes_behind_a_view_sql_readers_follow(
    workdir: Path, app: App, pgvector: PgvectorServer, pgvector_schema: str
) -> None:
    for k in range(1, 11):
        app.insert(k, body=f"body {k}")
    app.insert(11, body="")
    sink = _sink_toml(pgvector, pgvector_schema)
    cfg = write_config(workdir, sink=sink)
    await sync_once(cfg)
    cfg = write_config(workdir, sink=sink, text="{{ title }}\\n{{ body or 'untitled' }}")
    counts = await sync_once(cfg)  # builds version 2 beside version 1, swaps the alias
    assert counts["upserted"] == 11
    with pgvector.admin() as conn:
        kinds = dict(
            conn.execute(
                "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n "
                "ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind IN ('r', 'v')",
                (pgvector_schema,),
            ).fetchall()
        )
        [(definition,)] = conn.execute(
            "SELECT definition FROM pg_views WHERE schemaname = %s AND viewname = 'articles'",
            (pgvector_schema,),
        ).fetchall()
    assert kinds.pop("articles") == "v" and set(kinds.values()) == {"r"} and len(kinds) == 2
    [live] = [t for t in kinds if t in definition]  # the view reads the live version
    _assert_table_matches(pgvector, pgvector_schema, app, cfg)  # through the view, by name
    assert _table(pgvector, pgvector_schema, live) == _table(pgvector, pgvector_schema, "articles")


@pytest.mark.parametrize("payload_index", [True, False])
async def test_payload_updates_are_hot_updates_without_a_payload_index(
    pgvector: PgvectorServer, pgvector_schema: str, payload_index: bool
) -> None:
    """A HOT update writes no index entry; with an index on the payload none can be HOT, so
    each payload update also searches the HNSW graph to re-insert the row's vector."""
    sink = PgvectorSink("pg", pgvector.url, schema=pgvector_schema, payload_index=payload_index)
    await sink.open()
    rng = random.Random(5)
    spec = CollectionSpec(name="docs", dimension=64, distance="cosine", indexes={"n": "integer"})
    points = [
        Point(id=point_id("docs", k), vector=[rng.gauss(0, 1) for _ in range(64)], payload={"n": k})
        for k in range(300)
    ]
    try:
        await sink.ensure_collection(spec)
        await sink.upsert("docs", points)
        updates = [
            PayloadUpdate(id=p.id, set={"m": 1}, payload={"n": p.payload["n"], "m": 1})
            for p in points
        ]
        assert await sink.update_payloads("docs", updates) == []
        [rec] = await sink.retrieve("docs", [points[7].id], with_vectors=True)
        assert rec.payload == {"n": 7, "m": 1}
        where = [Condition(field="m", op="eq", value=1)]
        hits = await sink.search("docs", points[7].vector, limit=3, where=where)
        assert hits[0].record.id == points[7].id
    finally:
        await sink.close()  # its backend ends and reports its statistics

    def updated() -> tuple[int, int]:
        with pgvector.admin() as conn:
            row = conn.execute(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                "WHERE schemaname = %s AND relname = 'docs'",
                (pgvector_schema,),
            ).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    wait_for(lambda: updated()[0] >= len(points), deadline=30)
    total, hot = updated()
    assert total == len(points)
    if payload_index:
        assert hot == 0
    else:  # the half-empty pages keep nearly every new version beside the old one
        assert hot >= 0.9 * len(points)


async def test_an_alias_swap_keeps_views_readers_built_on_the_alias(
    pgvector: PgvectorServer, pgvector_schema: str
) -> None:
    sink = PgvectorSink("pg", pgvector.url, schema=pgvector_schema)
    await sink.open()
    try:
        for version in (1, 2, 3):
            dimension = 8 if version == 3 else 4
            await sink.ensure_collection(
                CollectionSpec(name=f"docs__v{version}", dimension=dimension, distance="cosine")
            )
            point = Point(id=point_id("docs", version), vector=[1.0] * dimension, payload={})
            await sink.upsert(f"docs__v{version}", [point])
        await sink.set_alias("docs", "docs__v1")
        with pgvector.admin() as conn:  # an application's own view over the alias
            conn.execute(
                sql.SQL("CREATE VIEW {} AS SELECT id FROM {}").format(
                    sql.Identifier(pgvector_schema, "app_ids"),
                    sql.Identifier(pgvector_schema, "docs"),
                )
            )
        await sink.set_alias("docs", "docs__v2")  # same dimension: replaced in place
        with pgvector.admin() as conn:
            ids = conn.execute(
                sql.SQL("SELECT id::text FROM {}").format(
                    sql.Identifier(pgvector_schema, "app_ids")
                )
            ).fetchall()
        assert ids == [(point_id("docs", 2),)]
        # another dimension cannot be swapped in under a view that depends on the alias
        with pytest.raises(PermanentError, match=r"8 dimensions, not 4.*app_ids.*drop them"):
            await sink.set_alias("docs", "docs__v3")
        assert await sink.alias_target("docs") == "docs__v2"
    finally:
        await sink.close()


@pytest.mark.parametrize("payload_index", [True, False])
async def test_a_selective_filter_still_fills_the_limit_with_the_nearest(
    pgvector: PgvectorServer, pgvector_schema: str, payload_index: bool
) -> None:
    """An HNSW scan yields ef_search candidates before filters: with 1 point in 100 matching,
    the sink must scan on (pgvector 0.8's iterative scan) or use the payload index."""
    # no sequential scan, so that the plan is an index's on this small table, as on a big one
    url = pgvector.url + ("&" if "?" in pgvector.url else "?") + "options=-c%20enable_seqscan%3Doff"
    sink = PgvectorSink("pg", url, schema=pgvector_schema, payload_index=payload_index)
    await sink.open()
    rng = random.Random(11)
    spec = CollectionSpec(name="docs", dimension=16, distance="cosine", indexes={"t": "keyword"})
    points = [
        Point(
            id=point_id("docs", k),
            vector=[rng.gauss(0, 1) for _ in range(16)],
            payload={"t": "rare" if k % 100 == 0 else "common", "k": k},
        )
        for k in range(2000)
    ]
    try:
        await sink.ensure_collection(spec)
        await sink.upsert("docs", points)
        query = [rng.gauss(0, 1) for _ in range(16)]
        rare = Condition(field="t", op="eq", value="rare")
        hits = await sink.search("docs", query, limit=15, where=[rare])
        # the exact answer, from every rare point
        norm = sum(x * x for x in query) ** 0.5

        def cosine(v: list[float]) -> float:
            return sum(a * b for a, b in zip(query, v, strict=True)) / (
                norm * sum(x * x for x in v) ** 0.5
            )

        exact = sorted(
            (p for p in points if p.payload["t"] == "rare"), key=lambda p: -cosine(p.vector)
        )
        assert len(hits) == 15 and all(h.record.payload["t"] == "rare" for h in hits)
        found = {h.record.payload["k"] for h in hits}
        # HNSW is approximate (its graph is built with random levels): near, not exact
        assert len(found & {p.payload["k"] for p in exact[:15]}) >= 13
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        by_k = {p.payload["k"]: p for p in points}
        assert all(
            h.score == pytest.approx(cosine(by_k[h.record.payload["k"]].vector), abs=1e-5)
            for h in hits
        )
    finally:
        await sink.close()


async def test_a_payload_jsonb_cannot_hold_is_dead_lettered_alone(
    workdir: Path, app: App, pgvector: PgvectorServer, pgvector_schema: str
) -> None:
    for k in range(1, 21):
        app.insert(k)
    app.update(7, author="nul\x00byte")  # text jsonb refuses (Qdrant stores it)
    cfg = write_config(workdir, sink=_sink_toml(pgvector, pgvector_schema), batch_size=8)
    counts = await sync_once(cfg)
    assert counts["failed"] == 1 and counts["upserted"] == 19
    async with Engine.open(load(cfg)) as engine:
        [letter] = await engine.state.dead_letters()
    assert letter.key == "7" and letter.error_type == "sink"
    assert "unsupported Unicode escape sequence" in letter.message
    assert point_id("articles", 7) not in _table(pgvector, pgvector_schema, "articles")

    app.update(7, author="fixed")
    app.update(8, author="nul\x00again")  # a payload-only update is refused alike
    await sync_once(cfg)
    async with Engine.open(load(cfg)) as engine:
        assert [d.key for d in await engine.state.dead_letters()] == ["8"]
    rows = _table(pgvector, pgvector_schema, "articles")
    assert rows[point_id("articles", 7)]["payload"]["author"] == "fixed"
    assert rows[point_id("articles", 8)]["payload"]["author"] == "ann"  # its last good payload


async def test_drift_made_in_sql_is_found_and_repaired(
    workdir: Path, app: App, pgvector: PgvectorServer, pgvector_schema: str
) -> None:
    for k in range(1, 31):
        app.insert(k)
    cfg = write_config(workdir, sink=_sink_toml(pgvector, pgvector_schema))
    await sync_once(cfg)
    table = sql.Identifier(pgvector_schema, "articles")
    with pgvector.admin() as conn:  # an application editing the table behind vectorsync
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE id = ANY(%s::uuid[])").format(table),
            ([point_id("articles", k) for k in (1, 2)],),
        )
        conn.execute(
            sql.SQL(
                'UPDATE {} SET payload = payload || \'{{"author": "mallory"}}\' WHERE id = %s'
            ).format(table),
            (point_id("articles", 5),),
        )
    async with Engine.open(load(cfg)) as engine:
        report = await engine.check("articles")
        assert set(report.keys("missing")) == {1, 2}
        assert set(report.keys("payload_mismatch")) == {5}
        await engine.repair(report)
        assert (await engine.check("articles")).consistent
    _assert_table_matches(pgvector, pgvector_schema, app, cfg)


@pytest.mark.parametrize("distance", ["cosine", "dot", "euclid"])
async def test_scores_and_order_match_qdrant_for_every_distance(
    pgvector: PgvectorServer, pgvector_schema: str, distance: Distance
) -> None:
    rng = random.Random(13)
    points = [
        Point(
            id=point_id("docs", k),
            vector=[rng.uniform(-2, 2) for _ in range(8)],
            payload={"k": k, "even": k % 2 == 0},
        )
        for k in range(60)
    ]
    spec = CollectionSpec(name="docs", dimension=8, distance=distance)
    query = [rng.uniform(-2, 2) for _ in range(8)]
    results = []
    for sink in (
        PgvectorSink("pg", pgvector.url, schema=pgvector_schema),
        QdrantSink("reference", path=":memory:"),
    ):
        await sink.open()
        try:
            await sink.ensure_collection(spec)
            await sink.upsert("docs", points)
            even = [Condition(field="even", op="eq", value=True)]
            hits = await sink.search("docs", query, limit=8, where=even)
            results.append([(h.record.payload["k"], h.score) for h in hits])
        finally:
            await sink.close()
    ours, reference = results
    assert [k for k, _ in ours] == [k for k, _ in reference]
    assert [s for _, s in ours] == pytest.approx([s for _, s in reference], abs=1e-4)
