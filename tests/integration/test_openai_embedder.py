"""The openai embedder against a real OpenAI-compatible server: infinity-emb serving the
bundled MiniLM, behind a proxy that counts requests at the server and injects 429, 503, 400
and 401 answers (tests/embedding_server.py)."""

from __future__ import annotations

import logging
import math
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.embedding_server import MODEL_NAME, REJECT, EmbeddingServer, proxy
from tests.helpers import App, load, write_config
from vectorsync.embed.openai import OpenAIEmbedder, TokenCounter
from vectorsync.engine import Engine
from vectorsync.errors import ConfigError, EmbeddingError

pytestmark = pytest.mark.embedding_server


@pytest.fixture
def server(infinity_url: str) -> Iterator[EmbeddingServer]:
    with proxy(infinity_url) as s:
        yield s


def _embedder_toml(server: EmbeddingServer, **options: object) -> str:
    lines = ['kind = "openai"', f'url = "{server.url}"', f'model = "{MODEL_NAME}"']
    for name, value in options.items():
        lines.append(f"{name} = {value!r}".replace("'", '"'))
    return "\n".join(lines)


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _texts(n: int) -> list[tuple[int, str]]:
    return [(k, f"note {k} about topic {k % 17}") for k in range(1, n + 1)]


def _insert(app: App, rows: list[tuple[int, str]]) -> None:
    with app.transaction():
        for k, body in rows:
            app.insert(k, body=body)


async def test_vectors_match_the_bundled_model_and_tokens_are_counted(
    server: EmbeddingServer,
) -> None:
    from tests.embedding_server import _model_folder

    embedder = OpenAIEmbedder(
        "api", url=server.url, model=MODEL_NAME, tokenizer=_model_folder(), batch_size=2
    )
    await embedder.open()
    try:
        texts = ["how do I reset my password", "invoices arrive monthly", "export a CSV"]
        vectors = await embedder.embed(texts)
        assert embedder.dimension == 384 and len(vectors) == 3
        assert embedder.counter is not None and embedder.counter.kind.startswith("tokenizer")
        assert embedder.tokens_used > 0
        # the same model: the password question is nearest to itself, far from invoices
        [again] = await embedder.embed([texts[0]])
        assert _cosine(vectors[0], again) > 0.9999
        assert _cosine(vectors[0], vectors[1]) < 0.9
    finally:
        await embedder.close()


async def test_texts_sent_sorted_by_length_come_back_in_their_own_order(
    server: EmbeddingServer,
) -> None:
    """The embedder sends texts grouped by length (less padding at the server); each vector
    still lands at its own text's place, and the tokens are counted once per text."""
    embedder = OpenAIEmbedder("api", url=server.url, model=MODEL_NAME, batch_size=2)
    await embedder.open()
    try:
        texts = [
            "export a CSV",
            "how do I reset my password when the reset e-mail never arrives at all",
            "invoices",
            "invoices arrive monthly, on the first working day, as PDF attachments",
            "a",
            "why is the dashboard slow",
        ]
        before = embedder.tokens_used
        vectors, used = await embedder.embed_metered(texts)
        assert embedder.tokens_used - before == used > 0
        for text, vector in zip(texts, vectors, strict=True):
            [alone] = await embedder.embed([text])
            assert _cosine(vector, alone) > 0.9999, text
    finally:
        await embedder.close()


@pytest.mark.slow  # two minutes at least: the limit is per minute
async def test_rate_limit_is_never_exceeded_in_any_60_s_window(
    workdir: Path, server: EmbeddingServer
) -> None:
    app = App(workdir / "app.db")
    rows = _texts(5000)
    _insert(app, rows)
    toml = _embedder_toml(server, batch_size=25, concurrency=4, requests_per_minute=120)
    async with Engine.open(load(write_config(workdir, embedder=toml))) as engine:
        await engine.run(once=True)
        [status] = await engine.status()
    assert status.records == 5000 and status.dead_letters == 0
    arrivals = sorted(server.faults.arrivals)
    assert len(arrivals) >= 200  # 5,000 texts / 25 per request, and the probe
    worst = max(
        sum(1 for t in arrivals[i:] if t < start + 60.0) for i, start in enumerate(arrivals)
    )
    assert worst <= 120, f"{worst} requests reached the server within 60 s"


async def test_429_with_retry_after_costs_retries_only(
    workdir: Path, server: EmbeddingServer
) -> None:
    app = App(workdir / "app.db")
    _insert(app, _texts(300))
    toml = _embedder_toml(server, batch_size=20, concurrency=2)
    async with Engine.open(load(write_config(workdir, embedder=toml))) as engine:
        await engine.prepare()
        server.faults.rate_limited_for(10.0, retry_after=1.0)
        await engine.run(once=True)
        [status] = await engine.status()
        embedder = engine.embedders["default"]
        assert isinstance(embedder, OpenAIEmbedder)
        assert embedder.rate_limited >= 5  # it waited the 429s out
        counted = (await engine.stats())["embedders"]["default"]  # what /metrics exports
        assert counted["rate_limited"] == embedder.rate_limited and counted["tokens"] > 0
        errors = await engine.state.errors()
    assert status.records == 300 and status.dead_letters == 0
    assert errors == []  # a rate limit is not an error


async def test_tokens_and_cost_are_counted_per_run_and_mapping(
    workdir: Path, server: EmbeddingServer
) -> None:
    app = App(workdir / "app.db")
    _insert(app, _texts(60))
    toml = _embedder_toml(server, batch_size=16, price_per_million_tokens=20.0)
    async with Engine.open(load(write_config(workdir, embedder=toml))) as engine:
        await engine.prepare()
        embedder = engine.embedders["default"]
        assert isinstance(embedder, OpenAIEmbedder)
        before = embedder.tokens_used  # the dimension probe's
        first = await engine.run(once=True)
        app.update(1, body="a longer text that costs a few more tokens than the others")
        app.update(2, author="zed")  # metadata only: no tokens
        second = await engine.run(once=True)
        [newer, older] = await engine.state.runs(limit=2)
        [status] = await engine.status()
        mapping = (await engine.stats())["mappings"]["articles"]
        billed = embedder.tokens_used - before
    assert older.id == first.run_id and newer.id == second.run_id
    assert older.counts["tokens"] > 60 and newer.counts["tokens"] > 0  # a text is >1 token
    assert older.counts["tokens"] + newer.counts["tokens"] == billed
    assert older.cost == pytest.approx(older.counts["tokens"] * 20.0 / 1e6)
    assert newer.cost == pytest.approx(newer.counts["tokens"] * 20.0 / 1e6)
    assert status.counters["tokens"] == billed == mapping["tokens"]
    assert mapping["cost_micros"] == pytest.approx(billed * 20.0, abs=2)


async def test_503s_are_one_retried_incident_and_lose_nothing(
    workdir: Path, server: EmbeddingServer
) -> None:
    app = App(workdir / "app.db")
    _insert(app, _texts(100))
    toml = _embedder_toml(server, batch_size=50, concurrency=1)
    async with Engine.open(load(write_config(workdir, embedder=toml))) as engine:
        await engine.prepare()
        server.faults.set(server_errors=3)
        await engine.run(once=True)
        [status] = await engine.status()
        errors = await engine.state.errors()
    assert status.records == 100 and status.dead_letters == 0
    [incident] = errors
    # each retry meets one 503 or more (a request in flight beside a failing one may take one)
    assert 1 <= incident.retry_count <= 3 and "503" in incident.message
    assert incident.status == "resolved"


async def test_a_text_the_endpoint_rejects_is_dead_lettered_alone(
    workdir: Path, server: EmbeddingServer
) -> None:
    app = App(workdir / "app.db")
    rows = _texts(60)
    rows[41] = (42, f"this one is {REJECT}")
    _insert(app, rows)
    toml = _embedder_toml(server, batch_size=16, concurrency=2)
    async with Engine.open(load(write_config(workdir, embedder=toml))) as engine:
        await engine.run(once=True)
        [status] = await engine.status()
        [letter] = await engine.state.dead_letters("articles")
    assert status.records == 59
    assert letter.key == "42" and "rejected the text (HTTP 400)" in letter.message


async def test_a_chunk_the_endpoint_rejects_dead_letters_its_record_whole(
    workdir: Path, server: EmbeddingServer
) -> None:
    app = App(workdir / "app.db")
    app.insert(1, body="fine words here. " * 8)
    app.insert(2, body="good words first. " * 4 + f"then {REJECT} once. " + "good again. " * 4)
    chunking = '[mappings.chunking]\nunit = "chars"\nsize = 60'
    cfg = write_config(
        workdir, text="{{ body }}", embedder=_embedder_toml(server), extra_mapping=chunking
    )
    async with Engine.open(load(cfg)) as engine:
        await engine.run(once=True)
        [letter] = await engine.state.dead_letters("articles")
        sink = engine.sinks["vectors"]
        keys = {r.payload["_vs_key"] async for r in sink.scroll("articles")}
    assert letter.key == "2" and "rejected the text (HTTP 400)" in letter.message
    assert keys == {1}  # none of record 2's chunks, not even those the endpoint accepted


async def test_a_refused_key_stops_naming_its_field_and_the_key_is_shown_nowhere(
    workdir: Path,
    server: EmbeddingServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    app = App(workdir / "app.db")
    _insert(app, _texts(5))
    secret = "sk-test-wrong-4f9c2a7d1e"
    monkeypatch.setenv("VS_TEST_EMBEDDING_KEY", secret)
    server.faults.set(key="sk-the-right-one")
    toml = _embedder_toml(server, api_key_env="VS_TEST_EMBEDDING_KEY")
    with pytest.raises(ConfigError) as caught:
        async with Engine.open(load(write_config(workdir, embedder=toml))) as engine:
            await engine.run(once=True)
    message = str(caught.value)
    assert "embedders.default.api_key_env" in message and "401" in message
    assert server.faults.authorizations[-1] == f"Bearer {secret}"  # it was sent, as a header
    assert secret not in message and secret not in caplog.text
    state = sqlite3.connect(workdir / ".vectorsync" / "state.db")
    for (table,) in state.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
        for row in state.execute(f'SELECT * FROM "{table}"'):
            assert secret not in repr(row), table


async def test_over_long_texts_are_cut_to_the_window_or_refused(server: EmbeddingServer) -> None:
    from tests.embedding_server import _model_folder

    counter = TokenCounter(MODEL_NAME, _model_folder())
    long = "word " * 600
    assert counter.count(long) > 256
    cut = counter.cut(long, 256)
    assert counter.count(cut) <= 256 and long.startswith(cut) and len(cut) > 1000
    embedder = OpenAIEmbedder(
        "api", url=server.url, model=MODEL_NAME, tokenizer=_model_folder(), max_input_tokens=256
    )
    await embedder.open()
    try:
        [vector] = await embedder.embed([long])
        assert len(vector) == 384 and embedder.texts_truncated == 1
    finally:
        await embedder.close()
    strict = OpenAIEmbedder(
        "api",
        url=server.url,
        model=MODEL_NAME,
        tokenizer=_model_folder(),
        max_input_tokens=256,
        truncate="error",
    )
    await strict.open()
    try:
        with pytest.raises(EmbeddingError, match="over the model's 256"):
            await strict.embed([long])
    finally:
        await strict.close()


def test_without_a_tokenizer_tokens_are_estimated_at_4_characters() -> None:
    counter = TokenCounter("some-local-model", None)
    assert counter.kind == "estimate"
    assert counter.count("x" * 9) == 3 and counter.count("") == 1
    assert os.environ.get("HF_HUB_OFFLINE") != "0"  # nothing was fetched to count


async def test_a_dry_run_counts_tokens_with_the_tokenizer_and_prices_them(
    workdir: Path, server: EmbeddingServer
) -> None:
    from tests.embedding_server import _model_folder

    app = App(workdir / "app.db")
    _insert(app, _texts(50))
    toml = _embedder_toml(server, tokenizer=_model_folder(), price_per_million_tokens=20.0)
    async with Engine.open(load(write_config(workdir, embedder=toml))) as engine:
        plan = await engine.reindex("articles", dry_run=True)
        texts = await engine.texts("articles", list(range(1, 51)))
    counter = TokenCounter(MODEL_NAME, _model_folder())
    tokens = sum(counter.count(t) for t in texts.values())
    assert plan["to_embed"] == 50 and plan["estimated_tokens"] == tokens
    assert plan["estimated_cost"] == round(tokens / 1e6 * 20.0, 4) > 0
