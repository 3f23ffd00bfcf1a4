"""Secrets never leave the process: passwords planted in every source and sink kind's
settings (URLs and separate fields), in the state store's URL and in the HTTP token are
looked for in every output — CLI output in each format, logs, error messages of a wrong
password and an unreachable server, every table of the state store, every HTTP response."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import App, GraphApp, PgApp, load, write_config
from tests.pgserver import PASSWORD, PgServer
from vectorsync.engine import Engine
from vectorsync.falkordb_server import falkordb_server
from vectorsync.server import create_app

GRAPH_PASSWORD = "gr4ph-s3cret-pw"
API_KEY = "qdr4nt-api-k3y-secret"
TOKEN = "http-t0ken-secret-value"
SECRETS = (PASSWORD, GRAPH_PASSWORD, API_KEY, TOKEN)
VECTORSYNC = [sys.executable, "-m", "vectorsync"]
# every read-only command, in each of its formats
COMMANDS = [
    ("run", "--once", "--verbose", "--log-format", "json"),
    ("run", "--once", "--verbose"),
    ("status",),
    ("status", "--json"),
    ("runs", "--json"),
    ("runs",),
    ("stats", "--json"),
    ("dlq", "list", "--json"),
    ("dlq", "list"),
    ("check", "--json"),
    ("check",),
]


def _cli(workdir: Path, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [*VECTORSYNC, *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "COLUMNS": "300", **(env or {})},
    )
    return f"$ vectorsync {' '.join(args)} -> {done.returncode}\n{done.stdout}{done.stderr}"


def _leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


@pytest.fixture(params=["sqlite", "pg-logical", "pg-outbox", "falkordb"])
def secret_app(
    request: pytest.FixtureRequest, workdir: Path
) -> Iterator[tuple[App, str, str | None]]:
    """(app, its source TOML, a URL with a wrong password) for each source kind, its
    credentials planted; SQLite's project keeps its state in PostgreSQL (a URL password)."""
    kind = request.param
    if kind == "falkordb":
        with falkordb_server(password=GRAPH_PASSWORD) as server:
            graph = GraphApp(server.url, "secrets")
            try:
                yield graph, graph.source_toml, server.url.replace(GRAPH_PASSWORD, "wrong-one")
            finally:
                graph.close()
        return
    if kind == "sqlite":
        app = App(workdir / "app.db")
        try:
            yield app, app.source_toml, None
        finally:
            app.close()
        return
    url = request.getfixturevalue("pg_url")
    pg = PgApp(url, kind.removeprefix("pg-"))
    try:
        yield pg, pg.source_toml, url.replace(PASSWORD, "wrong-one")
    finally:
        pg.close()


def _project(workdir: Path, app: App, source_toml: str, state_url: str | None) -> Path:
    (workdir / "source.toml").write_text(source_toml)
    cfg = write_config(workdir)
    text = cfg.read_text() + f'\n[http]\ntoken = "{TOKEN}"\n'
    if state_url is not None:
        text = text.replace('url = "sqlite:///.vectorsync/state.db"', f'url = "{state_url}"')
    cfg.write_text(text)
    app.insert(1)
    app.insert(2, title=None, body=None)  # a dead letter: its row is kept in the state store
    return cfg


def _state_dump(workdir: Path, state_url: str | None) -> str:
    """Every row of every state table, as text."""
    if state_url is None:
        db = sqlite3.connect(workdir / ".vectorsync" / "state.db")
        names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        rows = [repr(r) for n in names for r in db.execute(f'SELECT * FROM "{n}"')]
        db.close()
        return "\n".join(rows)
    import psycopg

    with psycopg.connect(state_url) as db:
        names = [
            r[0]
            for r in db.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            )
        ]
        return "\n".join(repr(r) for n in names for r in db.execute(f'SELECT * FROM "{n}"'))


def test_no_output_log_table_or_response_carries_a_secret(
    workdir: Path, secret_app: tuple[App, str, str | None], request: pytest.FixtureRequest
) -> None:
    app, source_toml, wrong_url = secret_app
    state_url = None
    if app.kind == "sqlite":  # the state store's URL carries the password here
        server: PgServer = request.getfixturevalue("pg")
        state_url = server.create_database(f"state_{os.getpid()}_{id(app)}")
    cfg = _project(workdir, app, source_toml, state_url)
    outputs = [_cli(workdir, *args) for args in COMMANDS]
    assert "-> 0" in outputs[0], outputs[0]
    if wrong_url is not None:  # a wrong password: the error names the server, not the secret
        override = {"VECTORSYNC_SOURCES__APP__URL": wrong_url}
        outputs.append(_cli(workdir, "status", "-v", env=override))
        outputs.append(_cli(workdir, "run", "--once", env=override))
        # the right password for a server that is not there: drivers quote the whole URL
        port = wrong_url.rsplit(":", 1)[1].split("/")[0]
        gone = wrong_url.replace(
            "wrong-one", GRAPH_PASSWORD if app.kind == "falkordb" else PASSWORD
        )
        gone = gone.replace(f":{port}", ":9")
        override = {"VECTORSYNC_SOURCES__APP__URL": gone}
        outputs.append(_cli(workdir, "status", "-v", env=override))
        outputs.append(_cli(workdir, "status", "--log-format", "json", "-v", env=override))
    # a Qdrant server that is not there, reached with an API key
    edge = 'kind = "qdrant-edge"\npath = ".vectorsync/qdrant"'
    server = f'kind = "qdrant"\nurl = "http://127.0.0.1:9"\napi_key = "{API_KEY}"\ntimeout = 1'
    assert edge in cfg.read_text()
    (workdir / "qdrant.toml").write_text(cfg.read_text().replace(edge, server))
    outputs.append(_cli(workdir, "search", "articles", "x", "-v", "-c", "qdrant.toml"))
    outputs.append(_cli(workdir, "status", "--json", "-c", "qdrant.toml"))
    for text in outputs:
        assert not _leaks(text), text
    assert not _leaks(_state_dump(workdir, state_url))
    for path in (workdir / ".vectorsync").rglob("*"):
        if path.is_file():
            raw = path.read_bytes()
            assert not [s for s in SECRETS if s.encode() in raw], path
    _http_responses_carry_no_secret(cfg)


def _http_responses_carry_no_secret(cfg: Path) -> None:
    import asyncio

    async def probe() -> None:
        async with Engine.open(load(cfg)) as engine:
            web = create_app(engine, token=TOKEN)
            auth = {"Authorization": f"Bearer {TOKEN}"}
            transport = httpx.ASGITransport(app=web)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://127.0.0.1:8787"
            ) as http:
                paths = ["/", "/metrics", "/healthz", "/readyz", "/api/status", "/api/runs"]
                paths += ["/api/dlq", "/api/checks", "/api/stats"]
                bodies = [(await http.get(p, headers=auth)).text for p in paths]
                bodies.append((await http.post("/api/check?mode=quick", headers=auth)).text)
                bodies.append((await http.get("/api/status")).text)  # refused: no token
        for body in bodies:
            assert not _leaks(body), body[:2000]

    asyncio.run(probe())


def test_a_graph_sink_password_stays_secret(workdir: Path, app: App) -> None:
    """The FalkorDB sink's URL password: in every command's output, its logs, the state
    store and the project's files, with the right password, a wrong one and no server."""
    with falkordb_server(password=GRAPH_PASSWORD) as server:
        sink = f'kind = "falkordb"\nurl = "{server.url}"\ngraph = "vectors"'
        cfg = write_config(workdir, sink=sink)
        cfg.write_text(cfg.read_text() + f'\n[http]\ntoken = "{TOKEN}"\n')
        app.insert(1)
        app.insert(2, title=None, body=None)  # a dead letter
        outputs = [_cli(workdir, *args) for args in COMMANDS]
        assert "-> 0" in outputs[0], outputs[0]
        outputs.append(_cli(workdir, "search", "articles", "title 1", "-v"))
        wrong = server.url.replace(GRAPH_PASSWORD, "wrong-one")
        gone = server.url.replace(f":{server.port}", ":9")
        for url in (wrong, gone):
            override = {"VECTORSYNC_SINKS__VECTORS__URL": url}
            outputs.append(_cli(workdir, "status", "--json", "-v", env=override))
            outputs.append(_cli(workdir, "run", "--once", "--log-format", "json", env=override))
        assert any("cannot reach FalkorDB at redis://:***@" in o for o in outputs[-4:])
        for text in outputs:
            assert not _leaks(text), text
        assert not _leaks(_state_dump(workdir, None))
        for path in (workdir / ".vectorsync").rglob("*"):
            if path.is_file():
                raw = path.read_bytes()
                assert not [s for s in SECRETS if s.encode() in raw], path
        _http_responses_carry_no_secret(cfg)
