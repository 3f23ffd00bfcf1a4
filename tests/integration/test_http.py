"""The HTTP side against a real engine (SQLite + qdrant-edge): every metric after a real
sync, probes, the JSON API, dead-letter replay, the bearer token, and the guards of a
token-less loopback server (Host, cross-site requests, one check at a time, redaction)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from tests.helpers import App, load, write_config
from vectorsync.check import CheckReport
from vectorsync.engine import Engine
from vectorsync.errors import ConfigError, SinkError, SourceError
from vectorsync.server import create_app, require_token
from vectorsync.sinks.qdrant_edge import QdrantEdgeSink

FAULTY_TEXT = "{{ title }}\\n{{ body }}{% if published == 0 %}{{ 1 // published }}{% endif %}"


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$", line)
        if m and ",".join(sorted((m.group(1) or "").split(","))) == want:
            return float(m.group(2))
    raise AssertionError(f"{name}{{{want}}} not in metrics")


ORIGIN = "http://127.0.0.1:8787"
MARKED = {"X-Vectorsync": "1"}  # what the dashboard's buttons send with their POSTs


def client(engine: Engine, **kwargs: object) -> httpx.AsyncClient:
    app = create_app(engine, **kwargs)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ORIGIN)


@asynccontextmanager
async def opened(
    workdir: Path, app: App, **kwargs: object
) -> AsyncIterator[tuple[Engine, httpx.AsyncClient]]:
    """An engine over one synced row, and a client of its app."""
    app.insert(1)
    async with Engine.open(load(write_config(workdir))) as engine, client(engine, **kwargs) as http:
        await engine.run(once=True)
        yield engine, http


async def test_every_metric_after_a_real_sync(workdir: Path, app: App) -> None:
    for k in range(1, 21):
        app.insert(k)
    app.update(4, published=0)  # dead-lettered (render error)
    cfg = write_config(workdir, text=FAULTY_TEXT)
    async with Engine.open(load(cfg)) as engine:
        await engine.run(once=True)
        app.update(5, author="zed")  # payload-only
        app.update(6, body="new text")  # re-embedded
        app.delete(7)
        await engine.run(once=True)
        await engine.check("articles")
        async with client(engine) as http:
            text = (await http.get("/metrics")).text
            head = await engine.head()
    assert metric(text, "vectorsync_changes_captured_total", source="app") == 23
    applied = {
        op: metric(text, "vectorsync_changes_applied_total", mapping="articles", operation=op)
        for op in ("upserted", "payload_only", "deleted", "skipped", "failed")
    }
    assert applied == {"upserted": 20, "payload_only": 1, "deleted": 1, "skipped": 0, "failed": 1}
    assert metric(text, "vectorsync_embeddings_total", mapping="articles", result="computed") == 20
    assert metric(text, "vectorsync_embeddings_total", mapping="articles", result="skipped") == 1
    assert metric(text, "vectorsync_sink_writes_total", mapping="articles", operation="delete") == 1
    assert metric(text, "vectorsync_embedder_texts_total", embedder="default") == 20
    assert "vectorsync_embedder_tokens_total{" not in text  # the hash embedder sends none
    assert metric(text, "vectorsync_errors_total", type="render") == 1
    assert metric(text, "vectorsync_dead_letters") == 1
    assert metric(text, "vectorsync_sync_latency_seconds_count", source="app") == 23
    assert metric(text, "vectorsync_batch_size_count", source="app") == 2
    assert metric(text, "vectorsync_position", source="app") == head
    assert metric(text, "vectorsync_lag_changes", source="app") == 0
    assert metric(text, "vectorsync_lag_seconds", source="app") == 0
    assert metric(text, "vectorsync_queue_depth", source="app") == 0
    # the checker renders row 4 as bad input: its old point cannot be judged, so it is not
    # counted as drift; the rest matches
    assert metric(text, "vectorsync_last_check_consistent", mapping="articles") == 1
    assert metric(text, "vectorsync_last_check_drift", mapping="articles", category="stale") == 0


class FlakySink(QdrantEdgeSink):
    down = False

    async def count(self, collection: str) -> int:
        if self.down:
            raise SinkError("sink unreachable (connection closed)")
        return await super().count(collection)

    async def upsert(self, collection: str, points: Sequence[object]) -> None:
        if self.down:
            raise SinkError("sink unreachable (connection closed)")
        await super().upsert(collection, points)  # type: ignore[arg-type]


async def test_readyz_fails_while_a_sink_is_down_and_recovers(workdir: Path, app: App) -> None:
    app.insert(1)
    cfg = write_config(workdir)
    sink = FlakySink("vectors", workdir / ".vectorsync" / "qdrant")
    async with Engine.open(load(cfg), sinks={"vectors": sink}) as engine, client(engine) as http:
        assert (await http.get("/readyz")).status_code == 503  # nothing opened yet
        await engine.run(once=True)
        assert (await http.get("/readyz")).status_code == 200
        sink.down = True
        down = await http.get("/readyz")
        assert down.status_code == 503
        assert "sink 'vectors'" in down.json()["problems"][0]
        assert (await http.get("/healthz")).status_code == 200
        sink.down = False
        assert (await http.get("/readyz")).json() == {"ready": True, "problems": []}


async def test_api_endpoints_and_dead_letter_replay(workdir: Path, app: App) -> None:
    for k in range(1, 4):
        app.insert(k)
    app.update(2, published=0)
    cfg = write_config(workdir, text=FAULTY_TEXT)
    async with Engine.open(load(cfg)) as engine:
        await engine.run(once=True)
        await engine.check("articles")
        async with client(engine) as http:
            [m] = (await http.get("/api/status")).json()["mappings"]
            assert m["records"] == 2 and m["dead_letters"] == 1
            [run] = (await http.get("/api/runs")).json()["runs"]
            assert run["status"] == "completed" and run["counts"]["failed"] == 1
            [letter] = (await http.get("/api/dlq")).json()["dead_letters"]
            assert letter["key"] == "2" and "stack_trace" not in letter
            [check] = (await http.get("/api/checks")).json()["checks"]
            assert check["mapping"] == "articles"
            now = (await http.post("/api/check?mode=quick", headers=MARKED)).json()
            # existence only; the dead-lettered row 2 (no point) is known, not drift
            assert now["checks"][0]["mode"] == "quick" and now["consistent"]
            assert now["checks"][0]["keys"]["dead_lettered"] == [2]
            assert now["checks"][0]["keys"]["missing"] == []
            [index] = (await http.get("/api/indexes")).json()["indexes"]
            assert index["mapping"] == "articles" and index["state"] == "live"
            assert index["version"] == 1 and index["records"] == 2
            assert (await http.get("/api/indexes?mapping=nosuch")).status_code == 400
            stats = (await http.get("/api/stats")).json()
            assert stats["sources"]["app"]["latency"]["count"] == 3
            page = await http.get("/")
            assert page.status_code == 200 and "vectorsync" in page.text
            app.update(2, published=2024)
            replay = await http.post(f"/api/dlq/{letter['id']}/replay", headers=MARKED)
            assert replay.status_code == 202 and replay.json() == {"enqueued": 1}
            assert (await http.post("/api/dlq/999/replay", headers=MARKED)).status_code == 404
            await engine.run(once=True)
            assert (await http.get("/api/dlq")).json()["dead_letters"] == []


async def test_bearer_token_beyond_loopback(workdir: Path, app: App) -> None:
    with pytest.raises(ConfigError, match="requires a bearer token"):
        require_token("0.0.0.0", None)
    require_token("127.0.0.1", None)
    require_token("::1", None)
    require_token("0.0.0.0", "s3cret")
    app.insert(1)
    cfg = write_config(workdir)
    async with Engine.open(load(cfg)) as engine, client(engine, token="s3cret") as http:
        assert (await http.get("/api/status")).status_code == 401
        assert (await http.get("/healthz")).status_code == 200  # probes stay open
        page = await http.get("/")  # a browser opens the page without a header
        assert page.status_code == 200 and "token" in page.text and "s3cret" not in page.text
        ok = await http.get("/api/status", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        wrong = await http.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401


async def test_bearer_scheme_is_case_insensitive(workdir: Path, app: App) -> None:
    async with opened(workdir, app, token="s3cret") as (_, http):
        for given in ("Bearer s3cret", "bearer s3cret", "BEARER s3cret"):
            ok = await http.get("/api/status", headers={"Authorization": given})
            assert ok.status_code == 200, given
        for given in ("Basic s3cret", "s3cret", "Bearer s3cre", "bearer s3cretx", "bearer"):
            wrong = await http.get("/api/status", headers={"Authorization": given})
            assert wrong.status_code == 401, given
            assert "Authorization: Bearer" in wrong.json()["error"]
        # with a token, the token is the protection: any Host, and no CSRF marker needed
        # (a cross-site page cannot send the token)
        lan = {"Host": "nas.lan:8787", "Authorization": "bearer s3cret"}
        assert (await http.get("/api/status", headers=lan)).status_code == 200
        assert (await http.post("/api/dlq/999/replay", headers=lan)).status_code == 404


async def test_foreign_host_names_are_refused_without_a_token(workdir: Path, app: App) -> None:
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 reaches
    this server, same-origin to itself, with ``Host: evil.example:8787``."""
    async with opened(workdir, app) as (_, http):
        for host in (
            "evil.example:8787",
            "evil.example",
            "127.0.0.1.evil.example",
            "localhost.evil.example:8787",
            "10.0.0.5:8787",
            "localhost:notaport",
            "",
        ):
            refused = await http.get("/api/status", headers={"Host": host})
            assert refused.status_code == 421, host
            assert "[http] token" in refused.json()["error"]
        for host in ("127.0.0.1:8787", "localhost:8787", "LOCALHOST", "[::1]:8787", "[::1]"):
            assert (await http.get("/api/status", headers={"Host": host})).status_code == 200


async def test_cross_site_posts_are_refused_without_a_token(workdir: Path, app: App) -> None:
    """CSRF: a page on another site can POST a form (or a simple fetch) to 127.0.0.1."""
    async with opened(workdir, app) as (_, http):
        form = {
            "Origin": "http://evil.example",
            "Content-Type": "application/x-www-form-urlencoded",
        }
        foreign = [
            form,
            {"Origin": "http://evil.example", **MARKED},
            {"Origin": "null", **MARKED},  # sandboxed frames, file:// pages
            {"Origin": "http://127.0.0.1:9999", **MARKED},  # another local service
            {"Referer": "http://evil.example/page", **MARKED},
        ]
        for headers in foreign:
            refused = await http.post("/api/dlq/999/replay", headers=headers)
            assert refused.status_code == 403, headers
            assert "is not this server's" in refused.json()["error"]
        # same origin but a simple request, which a cross-site form could send just as well
        for headers in ({"Origin": ORIGIN}, {}, {"Content-Type": "text/plain"}):
            unmarked = await http.post("/api/check", headers=headers)
            assert unmarked.status_code == 403, headers
            assert "X-Vectorsync: 1" in unmarked.json()["error"]
        # what browsers must preflight passes the guard (404: no such dead letter)
        for headers in (
            {"Origin": ORIGIN, **MARKED},
            {"Referer": f"{ORIGIN}/", **MARKED},
            {"Content-Type": "application/json; charset=utf-8"},
        ):
            passed = await http.post("/api/dlq/999/replay", headers=headers)
            assert passed.status_code == 404, headers
        page = (await http.get("/")).text
        # the dashboard's buttons send the marker: one POST options object, marked
        assert page.count('method: "POST"') == 1 and '"X-Vectorsync": "1"' in page


async def test_one_check_at_a_time(
    workdir: Path, app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checks run in the sync's event loop: while one runs, another is refused (429), so a
    burst of requests cannot starve the sync."""
    async with opened(workdir, app) as (engine, http):
        real = engine.check
        started, release = asyncio.Event(), asyncio.Event()
        calls = 0

        async def held(name: str, *, mode: str = "full", **_: object) -> CheckReport:
            nonlocal calls
            calls += 1
            if calls == 1:
                started.set()
                await release.wait()
            return await real(name, mode=mode)

        monkeypatch.setattr(engine, "check", held)
        first = asyncio.create_task(http.post("/api/check", headers=MARKED))
        try:
            await asyncio.wait_for(started.wait(), 10)
            busy = await http.post("/api/check?mode=quick", headers=MARKED)
            assert busy.status_code == 429
            assert int(busy.headers["Retry-After"]) >= 1
            assert "already running" in busy.json()["error"]
            assert calls == 1  # the refused request never reached the engine
        finally:
            release.set()
            done = await first
        assert done.status_code == 200 and done.json()["consistent"]
        again = await http.post("/api/check?mode=quick", headers=MARKED)
        assert again.status_code == 200  # the finished check let go


async def test_bad_query_values_are_400_naming_the_parameter(workdir: Path, app: App) -> None:
    async with opened(workdir, app) as (_, http):
        for url in (
            "/api/runs?limit=abc",
            "/api/runs?limit=0",
            "/api/runs?limit=99999999999999999999999",
            "/api/checks?limit=1001",
            "/api/checks?limit=-5",
            "/api/checks?limit=1_0",
            "/api/checks?limit=" + "9" * 5000,  # beyond what int() parses
        ):
            bad = await http.get(url)
            assert bad.status_code == 400, url
            assert bad.json()["parameter"] == "limit"
            assert "from 1 to 1000" in bad.json()["error"]
        assert (await http.get("/api/runs?limit=1000")).status_code == 200
        cases = {
            f"/api/dlq/{2**64}/replay": ("id", "from 1 to 9223372036854775807"),
            "/api/dlq/0/replay": ("id", "from 1 to"),
            "/api/dlq/abc/replay": ("id", "from 1 to"),
            f"/api/dlq/{'9' * 5000}/replay": ("id", "from 1 to"),
            "/api/check?mode=fast": ("mode", "full, sample, quick or prove"),
            "/api/check?mapping=nope": ("mapping", "mapping='nope': use articles"),
        }
        for url, (name, hint) in cases.items():
            bad = await http.post(url, headers=MARKED)
            assert bad.status_code == 400, url
            assert bad.json()["parameter"] == name and hint in bad.json()["error"], url


async def test_error_bodies_are_redacted(
    workdir: Path, app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "postgresql://u:secret@h/db"

    async def unreachable() -> list[object]:
        raise SourceError(f"source 'pg': could not connect to {url}")

    async def not_ready(**_: object) -> list[str]:
        return [f"source 'pg': connection to {url} refused"]

    async with opened(workdir, app) as (engine, http):
        monkeypatch.setattr(engine, "status", unreachable)
        monkeypatch.setattr(engine, "readiness", not_ready)
        failed = await http.get("/api/status")
        assert failed.status_code == 503
        assert "secret" not in failed.text
        assert "could not connect to postgresql://u:***@h/db" in failed.json()["error"]
        ready = await http.get("/readyz")
        assert ready.status_code == 503 and "secret" not in ready.text
        assert "postgresql://u:***@h/db" in ready.json()["problems"][0]


async def test_events_stream_every_kind(workdir: Path, app: App) -> None:
    import asyncio

    from vectorsync.events import (
        Captured,
        DeadLettered,
        Event,
        Inconsistent,
        RunFinished,
        RunStarted,
        SchemaEvolved,
        Synced,
    )

    for k in range(1, 6):
        app.insert(k)
    app.update(2, published=0)
    cfg = write_config(workdir, text=FAULTY_TEXT)
    seen: list[Event] = []
    async with Engine.open(load(cfg)) as engine:
        stream = engine.events()  # subscribed from here on

        async def listen() -> None:
            async for event in stream:
                seen.append(event)
                if isinstance(event, Inconsistent):
                    return

        listener = asyncio.create_task(listen())
        await engine.run(once=True)
        sink = engine.sinks["vectors"]
        await sink.delete("articles", [__import__("vectorsync").point_id("articles", 3)])
        await engine.check("articles")
        await asyncio.wait_for(listener, 10)
        stream.close()
    kinds = [type(e) for e in seen]
    assert kinds[:2] == [SchemaEvolved, RunStarted]  # the mapping is registered, then run
    assert RunFinished in kinds and kinds[-1] is Inconsistent
    [evolved] = [e for e in seen if isinstance(e, SchemaEvolved)]
    assert (evolved.mapping, evolved.version, evolved.evolution) == ("articles", 1, "create")
    captured = [(e.key, e.kind, e.action) for e in seen if isinstance(e, Captured)]
    assert sorted(captured) == [(k, "entity", "snapshot") for k in range(1, 6)]
    [synced] = [e for e in seen if isinstance(e, Synced)]
    assert synced.mapping == "articles" and synced.counts["upserted"] == 4
    [letter] = [e for e in seen if isinstance(e, DeadLettered)]
    assert letter.key == "2" and letter.error_type == "render"
    [finished] = [e for e in seen if isinstance(e, RunFinished)]
    assert finished.status == "completed" and finished.counts["failed"] == 1
    assert seen[-1].counts["missing"] == 1  # type: ignore[attr-defined]
