"""Shared test helpers: a SQLite application database, configs, and a convergence check
that reads both stores directly."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vectorsync.chunking import chunk_point_id, chunker_for, chunking_definition
from vectorsync.config import Config, MappingConfig, load_config
from vectorsync.embed.hash import HashEmbedder
from vectorsync.errors import PermanentError
from vectorsync.model import content_hash, point_id
from vectorsync.render import Renderer
from vectorsync.sinks.base import CollectionSpec, Sink
from vectorsync.sinks.memory import MemorySink
from vectorsync.sinks.qdrant_edge import QdrantEdgeSink

if TYPE_CHECKING:
    from vectorsync.engine import Engine

ARTICLES_DDL = (
    "CREATE TABLE articles (id INTEGER PRIMARY KEY, title TEXT, body TEXT, author TEXT, "
    "tags TEXT, published INTEGER)"
)
COLUMNS = ("id", "title", "body", "author", "tags", "published")
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "vector",
    "graph",
    "sync",
    "chunk",
    "entity",
    "embed",
    "crash",
    "order",
]


class App:
    """The application that owns the truth, writing to SQLite as any app would."""

    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        fresh = not path.exists()
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
        if fresh:
            self.db.execute(ARTICLES_DDL)

    @property
    def source_toml(self) -> str:
        return f'kind = "sqlite"\npath = "{self.path.name}"\npoll_interval = 0.05'

    def clone(self) -> App:
        """Another connection to the same database (for a writer thread)."""
        return App(self.path)

    def close(self) -> None:
        self.db.close()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run SQL written with ``?`` placeholders; the rows it returns."""
        return self.db.execute(sql, params).fetchall()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def inject(self, changes: Sequence[tuple[int, str]]) -> None:
        """Put raw (key, op) changes of ``articles`` into the change feed, as duplicates
        or out-of-order deliveries would."""
        from vectorsync.sources.sqlite import OUTBOX

        self.db.executemany(
            f"INSERT INTO {OUTBOX}(tbl, key, op) VALUES ('articles', ?, ?)", changes
        )

    def insert(self, key: int, **values: Any) -> None:
        row = {
            "title": f"title {key}",
            "body": f"body of {key}",
            "author": "ann",
            "tags": "a",
            "published": 2020,
            **values,
        }
        self.execute(
            "INSERT INTO articles (id, title, body, author, tags, published) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (key, row["title"], row["body"], row["author"], row["tags"], row["published"]),
        )

    def update(self, key: int, **values: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in values)
        self.execute(f"UPDATE articles SET {sets} WHERE id = ?", (*values.values(), key))

    def delete(self, key: int) -> None:
        self.execute("DELETE FROM articles WHERE id = ?", (key,))

    def change_key(self, old: int, new: int) -> None:
        self.execute("UPDATE articles SET id = ? WHERE id = ?", (new, old))

    def rows(self) -> dict[int, dict[str, Any]]:
        return {
            r[0]: dict(zip(COLUMNS, r, strict=True))
            for r in self.execute(f"SELECT {', '.join(COLUMNS)} FROM articles")
        }

    def random_ops(self, rng: random.Random, n: int, keys: int = 200) -> None:
        """Random inserts, text updates, metadata updates and deletes, in small transactions."""
        existing = set(self.rows())
        for _ in range(n):
            key = rng.randint(1, keys)
            op = rng.random()
            with self.transaction():
                if key not in existing:
                    self.insert(key, body=" ".join(rng.choices(WORDS, k=6)))
                    existing.add(key)
                elif op < 0.35:
                    self.update(key, body=" ".join(rng.choices(WORDS, k=6)))
                elif op < 0.7:
                    self.update(
                        key,
                        author=rng.choice(["ann", "bob", "cy"]),
                        published=rng.randint(2000, 2030),
                    )
                elif op < 0.8:
                    self.update(key, title=f"retitled {rng.randint(0, 9)}", tags="b")
                else:
                    self.delete(key)
                    existing.discard(key)


class PgApp(App):
    """The same application on PostgreSQL (either capture mode)."""

    def __init__(self, url: str, capture: str) -> None:
        import psycopg

        self.url = url
        self.capture = capture
        self.kind = f"pg-{capture}"
        self.pg = psycopg.connect(url, autocommit=True)
        exists = self.pg.execute("SELECT to_regclass('articles')").fetchone()
        if exists is None or exists[0] is None:
            self.pg.execute(ARTICLES_DDL.replace("INTEGER", "integer"))

    @property
    def source_toml(self) -> str:
        return (
            f'kind = "postgres"\nurl = "{self.url}"\ncapture = "{self.capture}"\n'
            "poll_interval = 0.2"
        )

    def clone(self) -> PgApp:
        return PgApp(self.url, self.capture)

    def close(self) -> None:
        self.pg.close()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if params:
            cur = self.pg.execute(sql.replace("?", "%s"), tuple(params))  # type: ignore[arg-type]
        else:
            cur = self.pg.execute(sql)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self.pg.transaction():
            yield

    def inject(self, changes: Sequence[tuple[int, str]]) -> None:
        import orjson

        if self.capture == "outbox":
            with self.pg.cursor() as cur:
                cur.executemany(
                    "INSERT INTO vectorsync.vectorsync_app_outbox (tbl, key, op) "
                    "VALUES ('articles', %s, %s)",
                    [(str(k), op) for k, op in changes],
                )
            return
        with self.pg.transaction():
            for k, op in changes:
                body = {"slot": "vectorsync_app", "table": "articles", "op": op, "keys": [k]}
                self.pg.execute(
                    "SELECT pg_logical_emit_message(true, 'vectorsync', %s::bytea)",
                    (orjson.dumps(body),),
                )


class GraphApp(App):
    """The same application on FalkorDB: ``articles`` nodes, written through vectorsync's
    graph writer (which records each change in the outbox in the same transaction)."""

    kind = "falkordb"

    def __init__(self, url: str, graph: str) -> None:
        import falkordb

        from vectorsync.graph import GraphWriter

        self.url, self.graph = url, graph
        self.writer = GraphWriter(url, graph)
        self._client = falkordb.FalkorDB.from_url(url)
        self.g = self._client.select_graph(graph)

    @property
    def source_toml(self) -> str:
        return (
            f'kind = "falkordb"\nurl = "{self.url}"\ngraph = "{self.graph}"\npoll_interval = 0.05'
        )

    def clone(self) -> GraphApp:
        return GraphApp(self.url, self.graph)

    def close(self) -> None:
        self.writer.close()
        self._client.close()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError("a graph has no SQL: use the App methods")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self.writer.transaction():
            yield

    def inject(self, changes: Sequence[tuple[int, str]]) -> None:
        import redis

        from vectorsync.sources.falkordb import encode_entry, outbox_key

        client = redis.Redis.from_url(self.url)
        pipe = client.pipeline()
        for key, op in changes:
            pipe.xadd(outbox_key(self.graph), encode_entry("articles", key, op))  # type: ignore[arg-type]
        pipe.execute()
        client.close()

    def insert(self, key: int, **values: Any) -> None:
        row = {"title": f"title {key}", "body": f"body of {key}", "author": "ann", "tags": "a"}
        self.writer.upsert_node("articles", {"id": key, **row, "published": 2020, **values})

    def update(self, key: int, **values: Any) -> None:
        self.writer.upsert_node("articles", {"id": key, **values})

    def delete(self, key: int) -> None:
        self.writer.delete_node("articles", key)

    def change_key(self, old: int, new: int) -> None:
        self.writer.execute(
            "MATCH (n:articles {id: $old}) SET n.id = $new",
            {"old": old, "new": new},
            changed=[("articles", new)],
            deleted=[("articles", old)],
        )

    def rows(self) -> dict[int, dict[str, Any]]:
        if not self._client.connection.exists(self.graph):
            return {}
        found = self.g.ro_query("MATCH (n:articles) RETURN properties(n)").result_set
        return {r[0]["id"]: {c: r[0].get(c) for c in COLUMNS} for r in found}


class SurrealApp(App):
    """The same application on an embedded SurrealDB (a surrealkv file): ``articles``
    records keyed by their record id. The file cannot be opened twice, so the app's
    connection is shared with every engine of the test's process (``share``)."""

    kind = "surrealdb"

    def __init__(self, path: Path) -> None:
        from surrealdb import Surreal

        from vectorsync.sources.surrealdb import share

        self.url = f"surrealkv://{path}"
        self.db: Any = Surreal(self.url)
        self.db.connect()
        self.db.use("app", "kb")
        share(self.url, self.db)
        # as the SQL apps create their table: a SurrealDB table exists once defined
        # (SurrealDB 2.3 answers IF NOT EXISTS on an existing table with an error: not one)
        reply = self.db.query_raw("DEFINE TABLE IF NOT EXISTS articles SCHEMALESS", {})
        for r in reply.get("result", ()):
            assert r["status"] == "OK" or "already exists" in str(r["result"]), reply

    @property
    def source_toml(self) -> str:
        return (
            f'kind = "surrealdb"\nurl = "{self.url}"\nnamespace = "app"\ndatabase = "kb"\n'
            "poll_interval = 0.05"
        )

    def clone(self) -> SurrealApp:
        raise NotImplementedError("an embedded SurrealDB file is open in one process only")

    def close(self) -> None:
        from vectorsync.sources.surrealdb import unshare

        if self.db is not None:  # once: a test may close and reopen the file
            unshare(self.url)
            self.db.close()
            self.db = None

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Any]:
        reply = self.db.query_raw(sql, dict(params or {}))
        assert "error" not in reply, reply
        assert all(r["status"] == "OK" for r in reply["result"]), reply
        return [r["result"] for r in reply["result"]]

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError("SurrealDB has no SQL: use the App methods")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        yield  # every App write is one statement: one transaction

    def inject(self, changes: Sequence[tuple[int, str]]) -> None:
        from vectorsync.sources.surrealdb import feed_entry

        for key, op in changes:
            self.query(*feed_entry("app", op, "articles", [key]))

    def insert(self, key: int, **values: Any) -> None:
        from vectorsync.sources.surrealdb import upsert_statement

        row = {"title": f"title {key}", "body": f"body of {key}", "author": "ann", "tags": "a"}
        self.query(*upsert_statement("articles", {"id": key, **row, "published": 2020, **values}))

    def update(self, key: int, **values: Any) -> None:
        self.query("UPDATE type::thing($t, $k) MERGE $v", {"t": "articles", "k": key, "v": values})

    def delete(self, key: int) -> None:
        from vectorsync.sources.surrealdb import delete_statement

        self.query(*delete_statement("articles", key))

    def change_key(self, old: int, new: int) -> None:
        self.query(
            "BEGIN; LET $r = (SELECT * OMIT id FROM ONLY type::thing('articles', $old)); "
            "DELETE type::thing('articles', $old); "
            "CREATE type::thing('articles', $new) CONTENT $r; COMMIT",
            {"old": old, "new": new},
        )

    def rows(self) -> dict[int, dict[str, Any]]:
        from vectorsync.sources.surrealdb import plain

        found = self.query("SELECT * FROM articles")[0]
        return {
            plain(r["id"]): {c: plain(r["id"]) if c == "id" else plain(r.get(c)) for c in COLUMNS}
            for r in found
        }


EDGE_SINK = 'kind = "qdrant-edge"\npath = ".vectorsync/qdrant"'


def write_config(
    folder: Path,
    *,
    sink: str | None = None,
    text: str = "{{ title }}\\n{{ body }}",
    extra_mapping: str = "",
    batch_size: int = 1000,
    embedder: str = 'kind = "hash"',
    also: Mapping[str, str] | None = None,
    sync: str = "",
    payload: Sequence[str] = ("author", "tags", "published"),
) -> Path:
    """The test project's config. ``also``: more sinks by name (their TOML), written by
    the mapping besides ``vectors`` (``sinks = [...]``); ``sync``: more [sync] settings."""
    path = folder / "vectorsync.toml"
    if sink is None:  # the `app` fixture leaves the sink under test here (else qdrant-edge)
        given = folder / "sink.toml"
        sink = given.read_text() if given.exists() else EDGE_SINK
    # the `app` fixture leaves the source section of the database under test here
    source = folder / "source.toml"
    source_toml = (
        source.read_text()
        if source.exists()
        else 'kind = "sqlite"\npath = "app.db"\npoll_interval = 0.05'
    )
    lines = [
        "[state]",
        'url = "sqlite:///.vectorsync/state.db"',
        "[sync]",
        f"batch_size = {batch_size}",
        sync,
        "[sources.app]",
        source_toml,
        "[sinks.vectors]",
        sink,
        *(line for name, toml in (also or {}).items() for line in (f"[sinks.{name}]", toml)),
        "[embedders.default]",
        embedder,
        "[[mappings]]",
        'name = "articles"',
        'source = "app"',
        'table = "articles"',
        'key = "id"',
        f'text = "{text}"',
        f"payload = {list(payload)!r}".replace("'", '"'),
        f"sinks = {['vectors', *also]!r}".replace("'", '"') if also else 'sink = "vectors"',
        extra_mapping,
    ]
    bus = folder / "bus.toml"  # scale-out tests leave their [bus] here (sync_once uses it)
    if bus.exists():
        lines += ["[bus]", bus.read_text()]
    path.write_text("\n".join(lines) + "\n")
    return path


async def read_sink(sink: Sink, collection: str, dimension: int = 384) -> dict[str, Any]:
    await sink.ensure_collection(
        CollectionSpec(name=collection, dimension=dimension, distance="cosine")
    )
    return {r.id: r async for r in sink.scroll(collection, with_vectors=True)}


async def assert_converged(
    config: Config, app: App, sink: Sink, mapping: MappingConfig | None = None
) -> None:
    """The sink holds exactly one point per live row, with the vector of its current text
    and its current payload — read from both stores directly (a chunked mapping: exactly
    the chunk points of a chunking of each current row)."""
    mapping = mapping or config.mappings[0]
    renderer = Renderer(mapping)
    made = config.embedders.get(mapping.embedder)
    embedder = HashEmbedder(dimension=getattr(made, "dimension", 384))
    rows = {k: row for k, row in app.rows().items() if mapping.selects(row)}  # embedder_by
    points = await read_sink(sink, mapping.collection_name, embedder.dimension)
    if mapping.chunking is not None:
        assert_chunks_match(config, rows, points, mapping)
        return
    expected_ids = {point_id(mapping.family, k): k for k in rows}
    missing, orphaned = set(expected_ids) - set(points), set(points) - set(expected_ids)
    assert not missing and not orphaned, f"missing {len(missing)}, orphaned {len(orphaned)}"
    for pid, key in expected_ids.items():
        rendered = renderer.render(rows[key])
        record = points[pid]
        for field, value in rendered.payload.items():
            assert record.payload[field] == value, (key, field)
        assert record.payload["_vs_key"] == key
        assert record.payload["_vs_text_hash"] == content_hash(embedder.model_id, rendered.text)
        assert record.vector is not None
        want = embedder.vector(rendered.text)
        assert max(abs(a - b) for a, b in zip(record.vector, want, strict=True)) < 1e-5, key


def assert_chunks_match(
    config: Config,
    rows: dict[Any, dict[str, Any]],
    points: dict[str, Any],
    mapping: MappingConfig | None = None,
) -> None:
    """Every chunk point equals a chunking of its current row (id, payload, position
    fields, vector of its own text), and there is no other point."""
    mapping = mapping or config.mappings[0]
    assert mapping.chunking is not None
    renderer = Renderer(mapping)
    embedder = HashEmbedder()
    chunker = chunker_for(chunking_definition(mapping.chunking, config.embedders.get("default")))
    assert chunker is not None
    expected: dict[str, tuple[Any, Any, int, dict[str, Any], str]] = {}
    for key, row in rows.items():
        rendered = renderer.render(row)
        chunks = chunker.split(rendered.text)
        for c in chunks:
            pid = chunk_point_id(mapping.family, key, c)
            expected[pid] = (key, c, len(chunks), rendered.payload, rendered.text)
    missing, orphaned = set(expected) - set(points), set(points) - set(expected)
    assert not missing and not orphaned, f"missing {len(missing)}, orphaned {len(orphaned)}"
    for pid, (key, chunk, count, payload, text) in expected.items():
        record = points[pid]
        for field, value in payload.items():
            assert record.payload[field] == value, (key, field)
        assert record.payload["_vs_key"] == key
        assert record.payload["chunk_index"] == chunk.index, key
        assert record.payload["chunk_count"] == count, key
        assert (record.payload["chunk_start"], record.payload["chunk_end"]) == (
            chunk.start,
            chunk.end,
        )
        assert text[chunk.start : chunk.end] == chunk.text
        assert record.payload["_vs_text_hash"] == content_hash(embedder.model_id, chunk.text)
        if mapping.chunking.store_text:
            assert record.payload["chunk_text"] == chunk.text
        want = embedder.vector(chunk.text)
        assert record.vector is not None
        assert max(abs(a - b) for a, b in zip(record.vector, want, strict=True)) < 1e-5, key


async def assert_edge_converged(config: Config, app: App, folder: Path) -> None:
    """assert_converged against the qdrant-edge folder of a project (vectorsync stopped)."""
    sink = QdrantEdgeSink("check", folder / ".vectorsync" / "qdrant")
    await sink.open()
    try:
        await assert_converged(config, app, sink)
    finally:
        await sink.close()


def load(path: Path) -> Config:
    return load_config(path)


async def sync_once(config_path: Path, embedder: HashEmbedder | None = None) -> dict[str, int]:
    """``run --once`` in-process (with a [bus]: ``capture --once`` then ``worker --once``);
    the run's counts plus the number of changes read."""
    from vectorsync.engine import Engine

    config = load(config_path)
    embedders = {"default": embedder} if embedder else None
    async with Engine.open(config, embedders=embedders) as engine:
        if config.bus is not None:  # scale-out: through the bus, capture then worker
            await engine.capture(once=True)
            result = await engine.work(once=True)
        else:
            result = await engine.run(once=True)
    return {"changes": result.changes, **result.counts}


async def check(config_path: Path, app: App) -> None:
    """The project's sink (opened directly from its config) matches the app's rows; each
    of them, for a mapping with several sinks."""
    from vectorsync.engine import build_sink

    config = load(config_path)
    first = config.mappings[0]
    cwd = Path.cwd()
    os.chdir(config_path.parent)  # a sink's relative path is the project's
    try:
        for m in (m for m in config.mappings if m.family == first.family):
            sink = build_sink(m.sink, config.sinks[m.sink], config)
            await sink.open()
            try:
                await assert_converged(config, app, sink, m)
            finally:
                await sink.close()
    finally:
        os.chdir(cwd)


def wait_for(condition: Callable[[], bool], deadline: float) -> None:
    """Poll ``condition`` until it holds; TimeoutError after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("condition not met before the deadline")
        time.sleep(0.02)


@contextlib.asynccontextmanager
async def streaming(engine: Engine) -> AsyncIterator[asyncio.Task[Any]]:
    """``engine.run()`` streaming in a task until the block ends."""
    stop = asyncio.Event()
    task = asyncio.create_task(engine.run(stop=stop))
    try:
        yield task
    finally:
        stop.set()
        await task


class RejectingSink(MemorySink):
    """Refuses, permanently, a point whose ``field`` holds ``value`` (like a schema-enforcing
    store)."""

    def __init__(self, field: str, value: Any) -> None:
        super().__init__()
        self.field, self.value = field, value

    def _refuse(self, payloads: Sequence[Mapping[str, Any]]) -> None:
        if any(p.get(self.field) == self.value for p in payloads):
            raise PermanentError(f"payload rejected: {self.field} {self.value!r} is not allowed")

    async def upsert(self, collection: str, points: Sequence[Any]) -> None:
        self._refuse([p.payload for p in points])
        await super().upsert(collection, points)

    async def update_payloads(self, collection: str, updates: Sequence[Any]) -> list[str]:
        self._refuse([u.payload for u in updates])
        return await super().update_payloads(collection, updates)
