from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import App, GraphApp, PgApp, SurrealApp
from tests.kafka_server import KafkaServer, kafka_server
from tests.pgserver import PgServer
from tests.pgvector_server import PgvectorServer, pgvector_server
from tests.redis_server import RedisServer, redis_server
from vectorsync.chroma_server import ChromaServer, chroma_server
from vectorsync.falkordb_server import FalkorDBServer, falkordb_server

# Tests marked ``all_sources`` run once per source kind; the rest on SQLite only.
# VECTORSYNC_TEST_SOURCES narrows the list (e.g. "sqlite" for a quick local run).
ALL_SOURCES = ["sqlite", "pg-logical", "pg-outbox", "falkordb", "surrealdb"]
SOURCES = [s for s in os.environ.get("VECTORSYNC_TEST_SOURCES", ",".join(ALL_SOURCES)).split(",")]
SINKS = ["qdrant-edge", "chroma", "pgvector", "falkordb"]
_databases = itertools.count(1)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "all_sources: runs against every source kind (SQLite, PostgreSQL x2, FalkorDB, SurrealDB)",
    )
    config.addinivalue_line(
        "markers",
        "all_sinks: also runs on SQLite against every other sink kind (Chroma, pgvector, FalkorDB)",
    )


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--slow",
        action="store_true",
        help="also run the trials marked slow (random-moment kills, a rate limit watched for "
        "two minutes, a second model...); the default run leaves them out to stay near 20 min",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow trial: run it with `scripts/test --slow`")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``source_kind`` by ``sink_kind``: every source kind with qdrant-edge (all_sources),
    and SQLite with every other sink kind (all_sinks)."""
    if "source_kind" in metafunc.fixturenames:
        marked = metafunc.definition.get_closest_marker("all_sources") is not None
        kinds = [k for k in SOURCES if marked or k == "sqlite"] or ["sqlite"]
        pairs = [(k, "qdrant-edge") for k in kinds]
        if metafunc.definition.get_closest_marker("all_sinks") is not None:
            pairs += [("sqlite", sink) for sink in SINKS if sink != "qdrant-edge"]
        ids = [k if sink == "qdrant-edge" else f"{k}-{sink}" for k, sink in pairs]
        metafunc.parametrize(("source_kind", "sink_kind"), pairs, ids=ids)


@pytest.fixture(scope="session")
def pg() -> Iterator[PgServer]:
    """One throwaway PostgreSQL 15 cluster (wal_level=logical) for the whole session."""
    server = PgServer()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


def drop_database(server: PgServer, name: str) -> None:
    with server.admin() as conn:
        conn.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
            "WHERE database = %s AND active_pid IS NOT NULL",
            (name,),
        )
        for (slot,) in conn.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE database = %s", (name,)
        ).fetchall():
            for _ in range(100):  # the walsender may take a moment to release it
                try:
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                    break
                except Exception:
                    conn.execute("SELECT pg_sleep(0.05)")
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database in the session cluster, dropped (with its slots) afterwards."""
    server: PgServer = request.getfixturevalue("pg")
    name = f"t{next(_databases)}_{os.getpid()}"
    url = server.create_database(name)
    try:
        yield url
    finally:
        drop_database(server, name)


@pytest.fixture(scope="session")
def pgvector() -> Iterator[PgvectorServer]:
    """One throwaway PostgreSQL 18 + pgvector for the whole session (tests use own schemas)."""
    with pgvector_server() as server:
        yield server


@pytest.fixture
def pgvector_schema(pgvector: PgvectorServer) -> Iterator[str]:
    """A schema name of the test's own in the pgvector server, dropped afterwards."""
    name = f"s{next(_databases)}_{os.getpid()}"
    try:
        yield name
    finally:
        pgvector.drop_schema(name)


@pytest.fixture(scope="session")
def falkordb() -> Iterator[FalkorDBServer]:
    """One throwaway FalkorDB server for the whole session (each test uses its own graph)."""
    with falkordb_server() as server:
        yield server


@pytest.fixture(scope="session")
def chroma() -> Iterator[ChromaServer]:
    """One throwaway Chroma server for the whole session (tests clear it after use)."""
    with chroma_server() as server:
        yield server


@pytest.fixture
def graph_name() -> str:
    return f"g{next(_databases)}_{os.getpid()}"


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A project folder; relative paths in configs resolve against it."""
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(old)


@pytest.fixture
def app(
    workdir: Path, source_kind: str, sink_kind: str, request: pytest.FixtureRequest
) -> Iterator[App]:
    """The application database of the kind under test, and the sink kind under test:
    ``write_config`` picks both up."""
    if sink_kind == "chroma":
        (workdir / "sink.toml").write_text('kind = "chroma"\npath = ".vectorsync/chroma"')
    elif sink_kind == "falkordb":
        nodes: FalkorDBServer = request.getfixturevalue("falkordb")
        graph = "sink_" + request.getfixturevalue("graph_name")
        (workdir / "sink.toml").write_text(
            f'kind = "falkordb"\nurl = "{nodes.url}"\ngraph = "{graph}"'
        )
    elif sink_kind == "pgvector":
        server: PgvectorServer = request.getfixturevalue("pgvector")
        schema = request.getfixturevalue("pgvector_schema")
        (workdir / "sink.toml").write_text(
            f'kind = "pgvector"\nurl = "{server.url}"\nschema_name = "{schema}"'
        )
    application: App
    if source_kind == "sqlite":
        application = App(workdir / "app.db")
    elif source_kind == "surrealdb":
        application = SurrealApp(workdir / "kb")
    elif source_kind == "falkordb":
        graph: FalkorDBServer = request.getfixturevalue("falkordb")
        application = GraphApp(graph.url, request.getfixturevalue("graph_name"))
    else:
        url = request.getfixturevalue("pg_url")
        application = PgApp(url, source_kind.removeprefix("pg-"))
    (workdir / "source.toml").write_text(application.source_toml)
    try:
        yield application
    finally:
        application.close()


@pytest.fixture(scope="session")
def infinity_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real OpenAI-compatible embedding server (infinity-emb serving the bundled MiniLM),
    for the session; its base URL."""
    from tests.embedding_server import infinity

    with infinity(tmp_path_factory.mktemp("infinity") / "infinity.log") as base:
        yield base


@pytest.fixture(scope="session")
def model2vec_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model2vec model distilled from the bundled MiniLM by ``vectorsync models distill``
    (a minute or two of CPU), once per session. Its --out folder exists beforehand, with a
    stale file: --force replaces it whole."""
    from vectorsync.embed.sentence_transformers import bundled_model_path

    out = tmp_path_factory.mktemp("model2vec") / "minilm-m2v"
    out.mkdir()
    (out / "stale.txt").write_text("from an older model")
    command = ["models", "distill", "--from", str(bundled_model_path()), "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "vectorsync", *command, "--force"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert f"saved {out}" in done.stderr and not (out / "stale.txt").exists()
    return out


# -- scale-out (tests/integration/test_scaleout.py, tests/e2e/test_scaleout_crash.py) -------
@pytest.fixture
def bus() -> Iterator[RedisServer]:
    """A durable Redis (append-only, fsync always) of the test's own, for the bus."""
    with redis_server() as server:
        yield server


@pytest.fixture
def kafka() -> Iterator[KafkaServer]:
    """A Kafka-protocol broker (Tansu, memory storage) of the test's own, for the bus."""
    with kafka_server() as server:
        yield server


@pytest.fixture
def durable_kafka() -> Iterator[KafkaServer]:
    """A Kafka-protocol broker (Tansu, ``s3://`` storage on a moto S3 emulator of the test's
    own) that a test can kill and start again without losing what it acknowledged."""
    with kafka_server(durable=True) as server:
        yield server


@pytest.fixture
def sapp(workdir: Path) -> Iterator[App]:
    """The SQLite application the scale-out tests write (workers re-read it)."""
    application = App(workdir / "app.db")
    try:
        yield application
    finally:
        application.close()


@pytest.fixture
def sink(pgvector: PgvectorServer, pgvector_schema: str) -> str:
    """A sink many processes write: pgvector, in the test's own schema."""
    return f'kind = "pgvector"\nurl = "{pgvector.url}"\nschema_name = "{pgvector_schema}"'
