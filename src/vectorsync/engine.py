"""The composition root: the only module that knows concrete adapters.

async with Engine.open(config) as engine:
    await engine.run(once=True)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import orjson
import xxhash
from pydantic import BaseModel, SecretStr
from sqlalchemy.engine import make_url

from ._tasks import gather_or_fail
from .backoff import Backoff, retrying
from .check import KNOWN, Checker, CheckReport
from .chunking import chunker_for
from .config import (
    GRAPH_SOURCES,
    SCHEMALESS_SOURCES,
    ChromaSinkConfig,
    Config,
    EmbedderConfig,
    FalkorDBSinkConfig,
    FalkorDBSourceConfig,
    HashEmbedderConfig,
    MappingConfig,
    Model2VecEmbedderConfig,
    Neo4jSinkConfig,
    Neo4jSourceConfig,
    OpenAIEmbedderConfig,
    PgvectorSinkConfig,
    PostgresSourceConfig,
    QdrantEdgeSinkConfig,
    QdrantSinkConfig,
    SinkConfig,
    SourceConfig,
    SparseEmbedderConfig,
    SurrealDBSourceConfig,
)
from .conflicts import Resolver, layout_for, parts_of, resolve_manually, vector_conflicts
from .embed.base import Embedder
from .embed.named import NamedVectors, layout_of, stored_layout
from .errors import ConfigError, RetryableError, VectorsyncError, classify, describe
from .events import (
    Captured,
    DeadLettered,
    Event,
    EventStream,
    Failed,
    Inconsistent,
    ReindexProgress,
    RunFinished,
    RunStarted,
    SchemaEvolved,
    Synced,
)
from .index.service import IndexService, version_config
from .mappings import check_keys, check_mapping
from .metrics import SourceStats
from .model import Change, Key
from .outages import isolated
from .preflight import preflight
from .redact import redact, redact_value, register_secrets
from .related import Relation, resolve
from .render import Renderer, template_columns
from .scaleout import ScaleOutStatus, build_bus, run_capture, run_workers
from .scaleout import status as scaleout_status
from .search import Where, conditions, nearest
from .sinks.base import CollectionSpec, Hit, IndexType, Maintained, Sink, Sized, index_type_for
from .sources.base import Source, TableSpec
from .state.leases import LeaseLost
from .state.runs import ErrorEntry, RunCounts
from .state.store import StateStore
from .worker import BatchReport, MappingRuntime, SourceWorker
from .writer import Compensate, Consistency, Writer, open_writer
from .writer import recover as recover_writes

__all__ = ["Engine", "MappingStatus", "RunResult"]

logger = logging.getLogger(__name__)
_INT_TYPES = frozenset({"INTEGER", "INT", "BIGINT", "SMALLINT"})
_ACTIONS = {"insert": "created", "update": "updated", "delete": "deleted", "truncate": "deleted"}


@dataclass(frozen=True, slots=True, kw_only=True)
class MappingStatus:
    mapping: str
    source: str
    sink: str
    collection: str
    position: int
    head: int
    lag_changes: int
    lag_seconds: float | None
    lag_bytes: int | None  # log the source keeps for us (a replication slot's lag)
    records: int
    outdated: int
    dead_letters: int
    counters: dict[str, int]
    sink_problems: list[str] = field(default_factory=list)  # what stops the sink taking writes
    backlog: int = 0  # records its sink was not written while down (several-sink mappings)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunResult:
    changes: int
    counts: dict[str, int]
    seconds: float
    run_id: int | None = None


def build_source(name: str, cfg: SourceConfig, config: Config, connection: Any = None) -> Source:
    """The source ``cfg`` names; ``connection``: an open client the application hands over
    (an embedded SurrealDB lives in the application's process)."""
    if connection is not None and not isinstance(cfg, SurrealDBSourceConfig):
        raise ConfigError(
            f"source {name!r}: a connection was handed over, but only a surrealdb source "
            "takes one (the others open their own from the config)"
        )
    if isinstance(cfg, SurrealDBSourceConfig):
        from .sources.surrealdb import SurrealDBSource

        return SurrealDBSource(
            name,
            cfg.url,
            namespace=cfg.namespace,
            database=cfg.database,
            username=cfg.username,
            password=cfg.password.get_secret_value() if cfg.password else None,
            retention=cfg.retention,
            beat_interval=cfg.beat_interval,
            poll_interval=cfg.poll_interval,
            connection=connection,
        )
    if isinstance(cfg, PostgresSourceConfig):
        from .sources.postgres import PostgresSource

        return PostgresSource(
            name,
            cfg.url,
            capture=cfg.capture,
            slot=cfg.slot,
            heartbeat_interval=cfg.heartbeat_interval,
        )
    if isinstance(cfg, FalkorDBSourceConfig):
        from .sources.falkordb import FalkorDBSource

        return FalkorDBSource(
            name,
            cfg.url,
            cfg.graph,
            capture=cfg.capture,
            version_property=cfg.version_property,
            poll_grace=cfg.poll_grace,
        )
    if isinstance(cfg, Neo4jSourceConfig):
        from .sources.neo4j import Neo4jSource

        return Neo4jSource(
            name,
            cfg.url,
            user=cfg.user,
            password=cfg.password.get_secret_value() if cfg.password else None,
            database=cfg.database,
            capture=cfg.capture,
            version_property=cfg.version_property,
            poll_grace=cfg.poll_grace,
        )
    from .sources.sqlite import SqliteSource

    return SqliteSource(name, config.resolve(cfg.path))


def build_sink(name: str, cfg: SinkConfig, config: Config) -> Sink:
    if isinstance(cfg, ChromaSinkConfig):
        from .sinks.chroma import ChromaSink

        folder = None if cfg.path is None else config.resolve(cfg.path)
        return ChromaSink(name, path=folder, url=cfg.url, timeout=cfg.timeout)
    if isinstance(cfg, QdrantEdgeSinkConfig):
        from .sinks.qdrant_edge import QdrantEdgeSink

        return QdrantEdgeSink(name, config.resolve(cfg.path), min_free_space=cfg.min_free_space)
    if isinstance(cfg, FalkorDBSinkConfig):
        from .sinks._graph_edges import edge_specs
        from .sinks.falkordb import FalkorDBSink

        return FalkorDBSink(
            name, cfg.url, graph=cfg.graph, timeout=cfg.timeout, edges=edge_specs(config, name)
        )
    if isinstance(cfg, Neo4jSinkConfig):
        from .sinks._graph_edges import edge_specs
        from .sinks.neo4j import Neo4jSink

        return Neo4jSink(
            name,
            cfg.url,
            user=cfg.user,
            password=cfg.password.get_secret_value() if cfg.password else None,
            database=cfg.database,
            edges=edge_specs(config, name),
        )
    if isinstance(cfg, PgvectorSinkConfig):
        from .sinks.pgvector import PgvectorSink

        return PgvectorSink(
            name, cfg.url, schema=cfg.schema_name, hnsw=cfg.hnsw, payload_index=cfg.payload_index
        )
    assert isinstance(cfg, QdrantSinkConfig)
    from .sinks.qdrant import QdrantSink

    path = cfg.path
    if path is not None and path != ":memory:":
        path = str(config.resolve(Path(path)))
    return QdrantSink(
        name,
        url=cfg.url,
        path=path,
        timeout=cfg.timeout,
        api_key=cfg.api_key.get_secret_value() if cfg.api_key else None,
    )


def build_embedder(name: str, cfg: EmbedderConfig, config: Config) -> Embedder:
    if isinstance(cfg, SparseEmbedderConfig):
        from .embed.sparse import SparseEncoder

        return SparseEncoder(name, tokenizer=cfg.tokenizer)
    if isinstance(cfg, HashEmbedderConfig):
        from .embed.hash import HashEmbedder

        return HashEmbedder(name, dimension=cfg.dimension, batch_size=cfg.batch_size)
    if isinstance(cfg, Model2VecEmbedderConfig):
        from .embed.model2vec import Model2VecEmbedder

        return Model2VecEmbedder(
            name, path=str(config.resolve(cfg.path)), batch_size=cfg.batch_size
        )
    if isinstance(cfg, OpenAIEmbedderConfig):
        from .embed.openai import OpenAIEmbedder

        key = cfg.api_key.get_secret_value() if cfg.api_key is not None else None
        if cfg.api_key_env is not None:
            key = os.environ.get(cfg.api_key_env) or None
            if key is None:
                raise ConfigError(
                    f"embedder {name!r}: the environment variable {cfg.api_key_env!r} "
                    "(api_key_env) is not set; export the API key in it"
                )
        register_secrets([key])
        return OpenAIEmbedder(
            name,
            url=cfg.url,
            model=cfg.model,
            api_key=key,
            api_key_field="api_key_env" if cfg.api_key_env else "api_key",
            dimensions=cfg.dimensions,
            batch_size=cfg.batch_size,
            max_batch_tokens=cfg.max_batch_tokens,
            max_input_tokens=cfg.max_input_tokens,
            truncate=cfg.truncate,
            requests_per_minute=cfg.requests_per_minute,
            tokens_per_minute=cfg.tokens_per_minute,
            concurrency=cfg.concurrency,
            timeout=cfg.timeout,
            price_per_million_tokens=cfg.price_per_million_tokens,
            tokenizer=None if cfg.tokenizer is None else str(config.resolve(Path(cfg.tokenizer))),
        )
    from .embed.sentence_transformers import SentenceTransformersEmbedder

    return SentenceTransformersEmbedder(
        name,
        model=None if cfg.model is None else str(config.resolve(Path(cfg.model))),
        batch_size=cfg.batch_size,
        threads=cfg.threads,
        concurrency=cfg.concurrency,
        normalize=cfg.normalize,
        device=cfg.device,
    )


def _relation_definition(rel: Relation) -> dict[str, Any]:
    return {
        "name": rel.name,
        "table": rel.table,
        "key": rel.key,
        "fields": [list(f) for f in rel.fields],
        "many": rel.many,
        "on": list(rel.on) if rel.on else None,
        "pattern": rel.pattern,
    }


def _used(config: Config, attr: str) -> set[str]:
    if attr == "embedder":  # the configured ones (a mapping with vectors uses several)
        return {e for m in config.mappings for e in m.embedders_used}
    return {getattr(m, attr) for m in config.mappings}


def _digest(value: Any) -> str:
    return xxhash.xxh3_64_hexdigest(orjson.dumps(value, option=orjson.OPT_SORT_KEYS))


async def _size(sink: Sink, collection: str) -> int | None:
    return await sink.collection_size(collection) if isinstance(sink, Sized) else None


def _secrets(value: Any) -> list[str]:
    """Every secret a config holds: SecretStr fields and the passwords of its URLs."""
    if isinstance(value, SecretStr):
        return [value.get_secret_value()]
    if isinstance(value, BaseModel):
        return [x for v in value.__dict__.values() for x in _secrets(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _secrets(v)]
    if isinstance(value, list | tuple):
        return [x for v in value for x in _secrets(v)]
    if isinstance(value, str) and "://" in value:
        with contextlib.suppress(Exception):
            password = make_url(value).password
            return [str(password)] if password else []
    return []


_IN_PLACE = ("table", "key", "payload", "collection", "column_types", "related")


def _in_place(definition: Mapping[str, Any]) -> str:
    """The digest of what a change re-checks in place (everything but what vectors are
    made of, which is an index version's)."""
    return _digest({k: definition.get(k) for k in _IN_PLACE})


def _lease_name(source: str) -> str:
    return f"source:{source}"


async def _first_of(work: asyncio.Task[None], beat: asyncio.Task[None]) -> None:
    """Wait for ``work``; if ``beat`` fails first (a lost lease), stop the work and raise.
    Cancelled, it cancels the work first (no worker outlives the run)."""
    try:
        await asyncio.wait([work, beat], return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        raise
    if not work.done():
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        beat.result()  # raises what ended it
    await work


def _totals(workers: list[SourceWorker]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for w in workers:
        for k, n in w.totals.items():
            totals[k] = totals.get(k, 0) + n
    return totals


def _run_counts(workers: list[SourceWorker]) -> RunCounts:
    counts = RunCounts()
    counts.add(_totals(workers))
    return counts


class Engine:
    """Holds the adapters built from one config. Sinks and embedders open lazily
    (``prepare``), so ``status`` never loads a model."""

    def __init__(
        self,
        config: Config,
        *,
        state: StateStore,
        sources: Mapping[str, Source],
        sinks: Mapping[str, Sink],
        embedders: Mapping[str, Embedder],
        backoff: Backoff | None = None,
    ) -> None:
        self.config = config
        self.state = state
        self.sources = dict(sources)
        self.sinks = dict(sinks)
        self.embedders = dict(embedders)
        for m in config.mappings:  # a mapping's named vectors: one embedder makes them all
            if m.vectors and m.embedder not in self.embedders:
                self.embedders[m.embedder] = NamedVectors(
                    m.embedder,
                    [(v.name, self.embedders[v.embedder]) for v in m.vectors],
                    max_chars=m.max_text_length,
                    cache=state if config.state.embedding_cache else None,
                )
        self.backoff = backoff or Backoff()
        self._columns: dict[str, dict[str, str]] = {}  # per mapping, with related fields
        self._relations: dict[str, tuple[Relation, ...]] = {}
        self._runtimes: list[MappingRuntime] | None = None
        self._opened: list[Any] = []
        self._sinks_open = False
        self._unreachable: set[str] = set()  # sinks down at start, written by copies only
        self._committed = asyncio.Event()  # replaced (and the old one set) at every commit
        self._workers: list[SourceWorker] = []
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self.events_dropped = 0
        self._stats = {name: SourceStats() for name in self.sources}
        self.instance_id = uuid.uuid4().hex[:12]
        self.heartbeat_interval = 5.0
        self._running = False  # a run of this engine is applying changes
        self.index = IndexService(self)
        self._prepare_lock = asyncio.Lock()  # opening is once per engine, whoever comes first
        self._sinks_lock = asyncio.Lock()

    @property
    def lease_ttl(self) -> float:
        """How long a runner's lease on its sources outlives its last heartbeat."""
        return self.heartbeat_interval * 6

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        config: Config,
        *,
        sources: Mapping[str, Source] | None = None,
        sinks: Mapping[str, Sink] | None = None,
        embedders: Mapping[str, Embedder] | None = None,
        state: StateStore | None = None,
        backoff: Backoff | None = None,
        connections: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[Engine]:
        """Open the state store and sources and validate every mapping against the live
        source; adapters passed in (e.g. in-memory ones) replace those the config names.
        ``connections``: source name → an open client of the application's to read that
        source through (an embedded SurrealDB: ``{"kb": db}``); it stays the caller's.
        Nothing is created (no state database, no folder) before the config is known good."""
        register_secrets(_secrets(config))
        if unknown := sorted(set(connections or {}) - set(config.sources)):
            raise ConfigError(
                f"connections given for {', '.join(map(repr, unknown))}: no source of that "
                f"name in the config (sources: {', '.join(sorted(config.sources)) or 'none'})"
            )
        preflight(
            config,
            sinks=() if sinks else _used(config, "sink"),
            embedders=() if embedders else _used(config, "embedder"),
        )
        engine = cls(
            config,
            state=state or StateStore(config.state_url()),
            sources=sources
            or {
                n: build_source(n, config.sources[n], config, (connections or {}).get(n))
                for n in _used(config, "source")
            },
            sinks=sinks
            or {n: build_sink(n, config.sinks[n], config) for n in _used(config, "sink")},
            embedders=embedders
            or {
                n: build_embedder(n, config.embedders[n], config) for n in _used(config, "embedder")
            },
            backoff=backoff,
        )
        try:
            for source in engine.sources.values():
                await source.open()
                engine._opened.append(source)
            await engine._validate()
            await engine.state.open()
            engine._opened.append(engine.state)
            yield engine
        finally:
            for part in reversed(engine._opened):
                await part.close()

    async def _validate(self) -> None:
        for m in self.config.mappings:
            checked = await check_mapping(
                m,
                self.sources[m.source],
                graph=self._graph(m),
                schemaless=self._schemaless(m),
                edges=isinstance(self.config.sources.get(m.source), SurrealDBSourceConfig),
            )
            self._columns[m.name], self._relations[m.name] = checked
        check_keys(self.config.mappings, self._relations)

    def _graph(self, m: MappingConfig) -> bool:
        return isinstance(self.config.sources.get(m.source), GRAPH_SOURCES)

    def _schemaless(self, m: MappingConfig) -> bool:
        return isinstance(self.config.sources.get(m.source), SCHEMALESS_SOURCES)

    # -- preparing to sync --------------------------------------------------------------
    async def prepare(self) -> list[MappingRuntime]:
        """Open sinks and embedders, install capture, register mapping schemas and create
        collections. Idempotent; ``vectorsync setup`` runs exactly this."""
        async with self._prepare_lock:
            if self._runtimes is None:
                self._runtimes = await self._prepare()
            return self._runtimes

    async def _prepare(self) -> list[MappingRuntime]:
        for embedder in self.embedders.values():
            if embedder not in self._opened:
                await embedder.open()
                self._opened.append(embedder)
        await self._open_sinks()
        snapshotted: set[tuple[str, str]] = set()
        for name, source in self.sources.items():
            specs = {
                spec
                for m in self.config.mappings
                if m.source == name
                for spec in (
                    TableSpec(table=m.table, key=m.key),
                    *(TableSpec(table=r.table, key=r.key) for r in self._relations[m.name]),
                    *(
                        TableSpec(table=r.edge, key="id", edge=True)
                        for r in self._relations[m.name]
                        if r.edge is not None
                    ),
                )
            }
            ordered = sorted(specs, key=lambda s: s.table)
            new = await retrying(
                f"{name}: install capture", partial(source.setup, ordered), self.backoff
            )
            snapshotted.update((name, table) for table in new)
            if new:
                logger.info(
                    "snapshot enqueued for %s",
                    ", ".join(new),
                    extra={"action": "snapshot", "source": name, "tables": new},
                )
        runtimes = []
        for m in self.config.mappings:
            legacy = await self._register(m, snapshotted=(m.source, m.table) in snapshotted)
            runtimes.extend(await self._targets(m, legacy))
        return runtimes

    async def _targets(
        self, m: MappingConfig, legacy: Mapping[str, Any] | None
    ) -> list[MappingRuntime]:
        """``m``'s targets; for a copy of a several-sink mapping whose sink was down at
        start, a placeholder the pipeline leaves behind (its keys go to the backlog) until
        a probe finds the sink back and builds the real targets (see outages)."""
        if m.sink not in self._unreachable:
            return await self.index.targets(m, legacy)

        async def ready() -> list[MappingRuntime]:
            sink = self.sinks[m.sink]
            await sink.open()
            self._unreachable.discard(m.sink)
            if sink not in self._opened:
                self._opened.append(sink)
            targets = await self.index.targets(m, legacy)
            if self._runtimes is not None:
                kept = [r for r in self._runtimes if r.config.name != m.name]
                self._runtimes = [*kept, *targets]
            return targets

        return [
            MappingRuntime(
                config=m,
                renderer=Renderer(m),
                embedder=self.embedders[m.embedder],
                sink=self.sinks[m.sink],
                schema_version="",
                int_key=self.int_key(m),
                pending=ready,
            )
        ]

    def _copies_only(self, sink: str) -> bool:
        """Whether every mapping writing ``sink`` is a copy of a several-sink mapping."""
        copies = isolated(self.config.mappings)
        writers = [m.name for m in self.config.mappings if m.sink == sink]
        return bool(writers) and all(name in copies for name in writers)

    async def teardown(self) -> list[str]:
        """Remove the change capture ``setup`` installed at each source (replication slot
        and publication, or triggers and outbox). Sinks and the state store are kept."""
        for source in self.sources.values():
            await source.teardown()
        return list(self.sources)

    async def _open_sinks(self) -> None:
        async with self._sinks_lock:
            if self._sinks_open:
                return
            for name, sink in self.sinks.items():
                try:
                    await sink.open()
                except RetryableError as exc:
                    if not self._copies_only(name):
                        raise
                    logger.error(
                        "sink %s is unreachable (%s): the mappings that write it start behind "
                        "and are caught up from the source when it is back",
                        name,
                        describe(exc),
                        extra={"action": "sink_down", "sink": name},
                    )
                    self._unreachable.add(name)
                    continue
                if sink not in self._opened:  # a status probe may have listed it already
                    self._opened.append(sink)
            self._sinks_open = True

    def sync_part(
        self, m: MappingConfig, model: str, dimension: int, distance: str
    ) -> dict[str, Any]:
        """What every point of a mapping is computed from: a change here re-checks every
        record. Its digest is the schema version written into each point."""
        columns = self._columns[m.name]
        used = self.digest_columns(m)
        part: dict[str, Any] = {
            "table": m.table,
            "key": m.key,
            "text": m.text,
            "payload": list(m.payload),
            "collection": m.collection_name,
            "model": model,
            "dimension": dimension,
            "distance": distance,
        }
        if not self._schemaless(m):  # sampled property types may vary with the data
            part["column_types"] = {c: columns[c] for c in used}
        if self._relations[m.name]:  # absent otherwise: older versions stay valid
            part["related"] = [_relation_definition(r) for r in self._relations[m.name]]
        if m.chunking is not None:  # likewise
            part["chunking"] = m.chunking.model_dump(mode="json")
        return part

    def index_types(self, m: MappingConfig) -> dict[str, IndexType]:
        indexes: dict[str, IndexType] = {}
        for name in m.payload:
            kind = index_type_for(self._columns[m.name][name])
            if kind is not None:
                indexes[name] = kind
        return indexes

    async def _register(
        self, m: MappingConfig, *, snapshotted: bool = False
    ) -> dict[str, Any] | None:
        """Register the mapping's definition in the schema registry; re-check every record
        in place when what points carry changed (payload, columns, relations). What their
        vectors are made of (model, dimension, distance, template) is an index version's
        business instead. Returns the index part of the definition registered before, if
        any (the version a collection from before index versions holds)."""
        embedder = self.embedders[m.embedder]
        columns = self._columns[m.name]
        sync_part = self.sync_part(m, embedder.model_id, embedder.dimension, embedder.distance)
        sync_digest = _digest(sync_part)
        definition = {**sync_part, "columns": columns, "sync_digest": sync_digest}
        versions = await self.state.schema_versions(m.name)
        last = versions[-1]["definition"] if versions else None
        # Enqueue the re-check before registering the version: a crash in between then
        # re-checks again at the next start instead of never.
        if last is None and not snapshotted:  # a new mapping of a table captured already
            logger.info(
                "mapping %s is new: every existing row of %s is enqueued",
                m.name,
                m.table,
                extra={"action": "snapshot", "mapping": m.name},
            )
            await self.sources[m.source].resnapshot(TableSpec(table=m.table, key=m.key))
        if last is not None and _in_place(last) != _in_place(sync_part):
            logger.info(
                "mapping %s changed what points carry: re-checking every record in place",
                m.name,
                extra={"action": "schema_recheck", "mapping": m.name},
            )
            await self.sources[m.source].resnapshot(TableSpec(table=m.table, key=m.key))
        version, evolution = await self.state.register_schema(
            m.name, _digest(definition), definition
        )
        if evolution is not None:
            if evolution != "create":
                logger.info(
                    "mapping %s: schema version %d registered (%s)",
                    m.name,
                    version,
                    evolution,
                    extra={"action": "schema_change", "mapping": m.name},
                )
            self.emit(SchemaEvolved(mapping=m.name, version=version, evolution=evolution))
        if last is None:
            return None
        return {k: last.get(k) for k in ("model", "dimension", "distance", "text")}

    async def source_targets(self, source: str) -> list[MappingRuntime]:
        """The runtimes of a source's mappings again (after a swap changed their versions)."""
        fresh = [
            rt
            for m in self.config.mappings
            if m.source == source
            for rt in await self._targets(m, None)
        ]
        if self._runtimes is not None:
            kept = [r for r in self._runtimes if r.config.source != source]
            self._runtimes = [*kept, *fresh]
        return fresh

    async def _problems(self, name: str) -> list[str]:
        """A sink's problems, probed whether or not it was opened (a probe may connect: the
        sink is then closed with the engine)."""
        sink = self.sinks[name]
        if sink not in self._opened:
            self._opened.append(sink)
        return await sink.problems()

    def keep_open(self, part: Any) -> None:
        """Close ``part`` with the engine (an embedder built for an older index version)."""
        self._opened.append(part)

    def columns(self, m: MappingConfig) -> dict[str, str]:
        return self._columns[m.name]

    def relations(self, m: MappingConfig) -> tuple[Relation, ...]:
        return self._relations[m.name]

    def resolver(
        self, m: MappingConfig
    ) -> Callable[[dict[Key, dict[str, Any]]], Awaitable[None]] | None:
        """How re-read rows are completed before rendering: related fields, and (graph
        sources, SurrealDB) NULL for properties a record does not have."""
        relations, schemaless = self._relations[m.name], self._schemaless(m)
        if not relations and not schemaless:
            return None
        return partial(
            resolve,
            self.sources[m.source],
            TableSpec(table=m.table, key=m.key),
            relations,
            columns=self.digest_columns(m) if schemaless else (),
        )

    def digest_columns(self, m: MappingConfig) -> tuple[str, ...]:
        deps = [r.deps_column for r in self._relations[m.name]]
        return tuple(sorted({m.key, *m.payload, *template_columns(m.text), *deps}))

    def int_key(self, m: MappingConfig) -> bool:
        """Whether the mapping's key column is an integer (record state keeps keys as text)."""
        return self.columns(m)[m.key].upper() in _INT_TYPES

    def is_text_key(self, m: MappingConfig) -> bool:
        return index_type_for(self._columns[m.name][m.key]) != "integer"

    # -- running ------------------------------------------------------------------------
    async def run(
        self,
        *,
        once: bool = False,
        stop: asyncio.Event | None = None,
        on_batch: Callable[[BatchReport], None] | None = None,
    ) -> RunResult:
        """Sync every source as one recorded run. ``once``: apply what was committed before
        the call, then return. Otherwise run until ``stop`` is set."""
        runtimes = await self.prepare()
        stop = stop or asyncio.Event()
        await self.recover()

        def committed(report: BatchReport) -> None:
            if on_batch is not None:
                on_batch(report)
            for mapping, counts in report.mappings.items():
                self.emit(
                    Synced(
                        mapping=mapping,
                        source=report.source,
                        position=report.position,
                        counts=counts,
                    )
                )
            if report.backfill is not None:  # one event per committed backfill page
                bf = report.backfill
                self.emit(
                    ReindexProgress(
                        mapping=bf["mapping"],
                        version=bf["version"],
                        done=bf["done"],
                        total=bf["total"],
                        rate=bf["rate"],
                        eta=bf["eta"],
                    )
                )
            for d in report.dead_letters:
                self.emit(
                    DeadLettered(
                        mapping=d.mapping, key=d.key, error_type=d.error_type, message=d.message
                    )
                )
            woken, self._committed = self._committed, asyncio.Event()
            woken.set()

        def captured(source: str, changes: Sequence[Change]) -> None:
            if not self._subscribers:  # events cost nothing when nobody listens
                return
            for c in changes:
                self.emit(
                    Captured(
                        source=source,
                        table=c.table,
                        key=c.key,
                        kind="relationship" if c.relation else "entity",
                        action=_ACTIONS.get(c.op, c.op),
                        relation=c.relation,
                        position=c.position,
                    )
                )

        run_id = await self.state.start_run(
            mode="once" if once else "stream",
            config_hash=self.config_hash,
            instance_id=self.instance_id,
            source_info=self._info("sources"),
            destination_info=self._info("sinks"),
        )
        workers: list[SourceWorker] = []
        beat: asyncio.Task[None] | None = None
        started = time.monotonic()
        try:
            leases = await self._take_leases(run_id)
            workers = [
                SourceWorker(
                    source,
                    [r for r in runtimes if r.config.source == name],
                    self.state,
                    batch_size=self.config.sync.batch_size,
                    max_in_flight=self.config.sync.max_in_flight,
                    poll_interval=self.config.sources[name].poll_interval
                    if name in self.config.sources
                    else 0.2,
                    embedding_cache=self.config.state.embedding_cache,
                    backoff=self.backoff,
                    on_batch=committed,
                    on_changes=partial(captured, name),
                    run_id=run_id,
                    stats=self._stats[name],
                    lease=(_lease_name(name), self.instance_id, leases[name]),
                    backfills=partial(self.index.backfills, name),
                    on_backfilled=self.index.backfilled,
                    expiring=partial(self.index.expiring, name),
                    on_expired=partial(self.source_targets, name),
                    outage_after=self.config.sync.sink_outage_after,
                )
                for name, source in self.sources.items()
            ]
            self._workers = workers
            self._running = True
            self.emit(RunStarted(run_id=run_id, mode="once" if once else "stream"))
            beat = asyncio.create_task(self._heartbeat(run_id, workers, leases))
            syncing = asyncio.create_task(
                gather_or_fail([asyncio.create_task(w.run(once=once, stop=stop)) for w in workers])
            )
            await _first_of(syncing, beat)
        except asyncio.CancelledError:
            await self._finish(run_id, workers, beat, "cancelled")
            raise
        except Exception as exc:
            await self._finish(run_id, workers, beat, "failed", exc)
            raise
        finally:
            self._running = False
            await self._release_leases()
        await self._finish(run_id, workers, beat, "completed")
        totals = _totals(workers)
        return RunResult(
            changes=totals.pop("changes", 0),
            counts=totals,
            seconds=time.monotonic() - started,
            run_id=run_id,
        )

    async def _take_leases(self, run_id: int | None = None) -> dict[str, int]:
        """One runner per source (whatever the sink): lease every source or none."""
        taken: dict[str, int] = {}
        try:
            for name in self.sources:
                taken[name] = await self.state.acquire_lease(
                    _lease_name(name), self.instance_id, ttl=self.lease_ttl, run_id=run_id
                )
        except BaseException:
            await self._release_leases()
            raise
        return taken

    async def _release_leases(self) -> None:
        for name in self.sources:
            with contextlib.suppress(VectorsyncError):
                await self.state.release_lease(_lease_name(name), self.instance_id)

    async def _heartbeat(
        self, run_id: int, workers: list[SourceWorker], leases: Mapping[str, int]
    ) -> None:
        """Beat the run and renew the leases; a lease taken over ends the run (LeaseLost)."""
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                for name, token in leases.items():
                    await self.state.renew_lease(
                        _lease_name(name), self.instance_id, token, ttl=self.lease_ttl
                    )
                await self.state.heartbeat(run_id, _run_counts(workers))
            except LeaseLost:
                raise
            except VectorsyncError as exc:  # keep syncing; the next beat may get through
                logger.warning("heartbeat failed: %s", exc, extra={"action": "heartbeat"})

    async def _finish(
        self,
        run_id: int,
        workers: list[SourceWorker],
        beat: asyncio.Task[None] | None,
        status: str,
        exc: BaseException | None = None,
    ) -> None:
        if beat is not None:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)
        counts = _run_counts(workers)
        error_type, code = classify(exc) if exc is not None else ("unknown", None)
        details = (
            None
            if exc is None
            else {"type": type(exc).__name__, "error_type": error_type, "code": code}
        )
        try:
            await self.state.complete_run(
                run_id,
                status=status,
                counts=counts,
                error_message=None if exc is None else str(exc),
                error_details=details,
            )
            if exc is not None:
                await self.state.log_error(
                    ErrorEntry(
                        error_type=error_type,
                        error_code=code,
                        message=str(exc),
                        run_id=run_id,
                        details={"run": run_id, "status": status},
                        stack_trace="".join(traceback.format_exception(exc)),
                    )
                )
        except VectorsyncError as err:
            logger.warning(
                "could not record the end of run %d: %s",
                run_id,
                err,
                extra={"action": "run_finish", "run": run_id},
            )
        if exc is not None:
            self.emit(Failed(run_id=run_id, error_type=error_type, message=str(exc)))
        self.emit(RunFinished(run_id=run_id, status=status, counts=asdict(counts)))

    async def recover(self) -> list[int]:
        """Mark runs whose process died as failed and put half-replayed dead letters back to
        pending; also applies retention. Runs at the start of every run."""
        failed = await self.state.recover_runs(stale_after=self.heartbeat_interval * 6)
        for run_id in failed:
            logger.warning(
                "run %d was left running by a dead process: marked failed",
                run_id,
                extra={"action": "recover", "run": run_id},
            )
        await self.state.cleanup(retention_days=self.config.state.retention_days)
        for source in {e.source for e in await self.state.journaled()} & set(self.sources):
            await recover_writes(self, source)  # writes of the write API a crash cut off
        return failed

    # -- scale-out (scaleout.py) -----------------------------------------------------------
    async def capture(self, stop: asyncio.Event | None = None, *, once: bool = False) -> None:
        """``vectorsync capture``: publish every source's changes to the [bus] (or stand by
        for a source another capture holds) until ``stop`` is set; ``once``: what was
        committed before the call, then return."""
        bus = build_bus(self)
        await bus.open()
        try:
            await run_capture(self, bus, stop or asyncio.Event(), once=once)
        finally:
            await bus.close()

    async def work(self, stop: asyncio.Event | None = None, *, once: bool = False) -> RunResult:
        """``vectorsync worker``: apply this worker's share of the bus partitions until
        ``stop`` is set; ``once``: every partition up to what the bus holds, then return."""
        bus = build_bus(self)
        await bus.open()
        started = time.monotonic()
        try:
            totals = await run_workers(self, bus, stop or asyncio.Event(), once=once)
        finally:
            await bus.close()
        changes = totals.pop("changes", 0)
        return RunResult(changes=changes, counts=totals, seconds=time.monotonic() - started)

    async def scaleout_status(self) -> ScaleOutStatus:
        """The capture holders, the workers alive and every partition's holder and depth."""
        bus = build_bus(self)
        await bus.open()
        try:
            return await scaleout_status(self, bus)
        finally:
            await bus.close()

    def writer(
        self,
        source: str,
        *,
        consistency: Consistency = "strong",
        compensate: Compensate = "dead_letter",
        timeout: float = 30.0,
    ) -> contextlib.AbstractAsyncContextManager[Writer]:
        """Write ``source`` through the journal (see writer.py): ``strong`` returns once
        every sink has the write, ``eventual`` once the source committed it; a sink's
        permanent refusal is dead-lettered, or with ``compensate="undo"`` the source row is
        restored and :class:`~vectorsync.writer.WriteRejected` raised."""
        return open_writer(
            self, source, consistency=consistency, compensate=compensate, timeout=timeout
        )

    def describe(self) -> list[str]:
        """What this engine syncs, one line per source, sink and mapping, without secrets
        (what ``run`` and ``serve`` print at start)."""
        lines = []
        for name, source in self.sources.items():
            cfg = self.config.sources.get(name)
            kind = cfg.kind if cfg is not None else type(source).__name__
            capture = getattr(source, "capture_mode", None) or getattr(source, "capture", None)
            capture = capture or ("trigger outbox" if kind == "sqlite" else None)
            where = getattr(cfg, "path", None) or getattr(cfg, "url", None) or ""
            how = f" ({capture} capture)" if capture else ""
            lines.append(f"source {name}: {kind} {where}{how}")
        for name in sorted(_used(self.config, "sink")):
            sink_cfg = self.config.sinks[name]
            where = getattr(sink_cfg, "url", None) or getattr(sink_cfg, "path", None) or ""
            lines.append(f"sink {name}: {sink_cfg.kind} {where}")
        for m in self.config.mappings:
            embedder = self.embedders.get(m.embedder)
            model = getattr(embedder, "model_id", "") or m.embedder
            lines.append(
                f"mapping {m.name}: {m.source}.{m.table} → {m.sink}/{m.collection_name} "
                f"(embedder {m.embedder}: {model})"
            )
        return [redact(line) for line in lines]

    def _info(self, section: str) -> dict[str, Any]:
        """Where data comes from or goes, without credentials."""
        used = _used(self.config, section[:-1])
        entries = getattr(self.config, section)
        return {
            name: redact_value(entries[name].model_dump(mode="json", exclude={"api_key"}))
            for name in sorted(used)
        }

    @property
    def config_hash(self) -> str:
        return xxhash.xxh3_64_hexdigest(self.config.model_dump_json(exclude={"base_dir"}).encode())

    async def replay_dead_letters(
        self, ids: Sequence[int] | None = None, *, mapping: str | None = None
    ) -> int:
        """Send dead letters (pending ones, or those ``ids``) back through the normal sync
        path: their keys are enqueued at the source and marked 'processing'; the next batch
        that syncs a key resolves its dead letter. Returns how many were enqueued."""
        letters = await self.state.dead_letters(mapping=mapping, status=None, ids=ids)
        letters = [
            d
            for d in letters
            if d.status in ("pending", "processing") and (ids is not None or d.status == "pending")
        ]
        unkeyed = [d for d in letters if d.details.get("error_code") == "invalid_key"]
        if unkeyed:  # no key to re-read them by: their row's next change (a new key) comes alone
            logger.warning(
                "%d dead letters have no usable key and cannot be replayed; fix their rows' keys "
                "(the change arrives by itself) or discard them",
                len(unkeyed),
                extra={"action": "dlq_replay", "count": len(unkeyed)},
            )
            letters = [d for d in letters if d not in unkeyed]
        mappings = {m.name: m for m in self.config.mappings}
        by_table: dict[tuple[str, str], list[Any]] = {}
        for d in letters:
            m = mappings.get(d.mapping)
            if m is None:
                raise ConfigError(
                    f"dead letter {d.id}: mapping {d.mapping!r} is no longer "
                    "configured; discard it with `vectorsync dlq discard`"
                )
            by_table.setdefault((m.source, m.table), []).append(d.details.get("key", d.key))
        for source in {source for source, _ in by_table}:
            await self._require_capture(source, "a dead-letter replay")
        for (source, table), keys in by_table.items():
            await self.sources[source].enqueue(table, keys)
        await self.state.set_dead_letter_status(
            [d.id for d in letters if d.id is not None], "processing"
        )
        return len(letters)

    async def resolve_conflict(
        self, conflict_id: int, keep: Literal["source", "sink"]
    ) -> dict[str, Any]:
        """Apply a choice to a logged conflict (see conflicts.resolve_manually)."""
        return await resolve_manually(self, conflict_id, keep)

    async def discard_dead_letters(self, ids: Sequence[int]) -> int:
        return await self.state.set_dead_letter_status(ids, "discarded")

    # -- consistency ----------------------------------------------------------------------
    async def checker(self, mapping: str) -> Checker:
        """A checker for one mapping's live index version (no model is loaded: the model
        id, dimension and template are the version's own)."""
        m = self.mapping(mapping)
        history = await self.state.schema_versions(m.name)
        live = next((v for v in await self.state.index_versions(m.name) if v.state == "live"), None)
        if not history and live is None:
            raise ConfigError(
                f"mapping {m.name!r} was never synced: run `vectorsync run "
                "--once` before checking it"
            )
        made = dict(live.definition) if live is not None else history[-1]["definition"]
        cfg = version_config(m, made)
        await self._open_sinks()
        sink = self.sinks[m.sink]
        collection = live.collection if live is not None else m.collection_name
        await sink.ensure_collection(
            CollectionSpec(
                name=collection,
                dimension=made["dimension"],
                distance=made["distance"],
                vectors=stored_layout(made),
            )
        )
        schema = _digest(self.sync_part(cfg, made["model"], made["dimension"], made["distance"]))
        # a policy that resolves conflicts: its vectors are compared too (full mode)
        kept = await self.state.kept(m.name) if m.conflicts != "source_wins" else None
        return Checker(
            mapping=m.name,
            source=self.sources[m.source],
            table=m.table,
            key=m.key,
            renderer=Renderer(cfg, self.index_types(m)),
            sink=sink,
            collection=collection,
            payload_fields=m.payload,
            model_id=made["model"],
            schema_version=schema,
            state=self.state,
            digest_columns=self.digest_columns(cfg),
            resolve=self.resolver(m),
            chunker=chunker_for(made.get("chunking")),
            family=m.family,
            select=m.row_filter,
            resolver=Resolver(m),
            kept=kept,
            vectors=None
            if kept is None
            else partial(
                vector_conflicts,
                Resolver(m),
                sink=sink,
                collection=collection,
                state=self.state,
                state_name=m.name,
                model_id=made["model"],
                parts=parts_of(stored_layout(made), made["dimension"], made["distance"]),
                kept=kept,
            ),
        )

    async def check(
        self,
        mapping: str,
        *,
        mode: str = "full",
        sample_size: int = 1000,
        seed: int | None = None,
        repair_of: int | None = None,
    ) -> CheckReport:
        """Run one consistency check and store it (duration and counts) in ``checks``.
        While this engine streams, drift the check saw is confirmed once the sync has
        applied what was committed when the check began: a change in flight is not drift."""
        checker = await self.checker(mapping)
        started = time.time()
        source = self.mapping(mapping).source
        head = await self.head(source) if self._running else None
        if mode == "full":
            report = await checker.full()
        elif mode == "sample":
            report = await checker.sample(sample_size, seed=seed)
        elif mode == "quick":
            report = await checker.quick()
        elif mode == "prove":
            report = await checker.prove()
        else:
            raise ConfigError(f"check mode {mode!r}: use full, sample, quick or prove")
        if head is not None and not report.consistent:
            with contextlib.suppress(TimeoutError):
                await self.wait_for(head, source=source, timeout=60)
            await checker.confirm(report)
        full = report.as_dict()
        report.id = await self.state.save_check(
            {
                "mapping": report.mapping,
                "mode": mode,
                "started_at": started,
                "duration_ms": int(report.seconds * 1000),
                "consistent": int(report.consistent),
                "source_records": report.source_records,
                "sink_points": report.sink_points,
                "counts": report.counts,
                "repair_of": repair_of,
                "report": {k: v for k, v in full.items() if k not in ("id", "counts")},
            }
        )
        if not report.consistent:
            self.emit(
                Inconsistent(mapping=report.mapping, check_id=report.id, counts=report.counts)
            )
        return report

    async def check_and_repair(
        self,
        mapping: str,
        *,
        mode: str = "full",
        repair: bool = False,
        sample_size: int = 1000,
        seed: int | None = None,
    ) -> dict[str, Any]:
        """A check and, when asked and drift was found, its repair and the check after it:
        ``{"before": report, "repair_run": id, "after": report}`` (``check --repair``)."""
        report = await self.check(mapping, mode=mode, sample_size=sample_size, seed=seed)
        entry: dict[str, Any] = {"before": report.as_dict()}
        if repair and not report.consistent:
            run = await self.repair(report)
            after = await self.check(
                mapping, mode=mode, sample_size=sample_size, seed=seed, repair_of=report.id
            )
            entry.update(repair_run=run.run_id, after=after.as_dict())
        return entry

    async def repair(self, report: CheckReport) -> RunResult:
        """Repair what a check found through the normal sync path: forget the record state
        of drifted keys and enqueue them at the source (missing, stale, outdated and
        mismatched points are rewritten; vectors come from the embedding cache when the
        text did not change); delete orphaned points."""
        m = self.mapping(report.mapping)
        await self._require_capture(m.source, "a repair")
        orphans = [d.point_id for d in report.drift if d.category == "orphaned"]
        keys = report.keys("missing", "stale", "outdated", "payload_mismatch")
        if self._running:  # this engine streams: its run applies the repair
            started = time.monotonic()
            await self._repair_writes(m, report, orphans, keys)
            await self.wait_for(await self.head(m.source), source=m.source, timeout=600)
            return RunResult(changes=len(keys), counts={}, seconds=time.monotonic() - started)
        await self._take_leases()  # another runner applying these keys would race us
        try:
            await self._repair_writes(m, report, orphans, keys)
        except BaseException:
            await self._release_leases()
            raise
        return await self.run(once=True)

    async def _repair_writes(
        self, m: MappingConfig, report: CheckReport, orphans: list[str], keys: list[Key]
    ) -> None:
        """Delete orphans, forget what is rewritten in full, enqueue those keys."""
        await self._open_sinks()
        if orphans:
            await self.sinks[m.sink].delete(m.collection_name, orphans)
        # rewritten in full; an unrenderable row keeps its state and point (dead-lettered);
        # a point others edited keeps its state where the policy resolves it when synced
        resolving = m.conflicts != "source_wins"
        forgotten = [
            d.key
            for d in report.drift
            if d.key is not None
            and d.category != KNOWN
            and not d.unrenderable
            and not (d.conflict and resolving)
        ]
        await self.state.forget(m.name, [str(k) for k in forgotten])
        overwritten = [str(d.key) for d in report.drift if d.conflict and not resolving]
        if overwritten:  # source_wins: the repair's rewrite is the resolution
            await self.state.close_conflicts(m.name, overwritten)
        if keys:
            await self.sources[m.source].enqueue(m.table, keys)

    def mapping(self, name: str) -> MappingConfig:
        for m in self.config.mappings:
            if m.name == name:
                return m
        known = ", ".join(m.name for m in self.config.mappings)
        raise ConfigError(f"no mapping named {name!r} (mappings: {known})")

    async def head(self, source: str | None = None) -> int:
        """The newest committed position of a source (the only one when not named): what a
        writer reads after its commit to wait for its own write with :meth:`wait_for`."""
        return await self._source(source).head()

    async def wait_for(
        self, position: int, *, source: str | None = None, timeout: float = 30.0
    ) -> None:
        """Return once everything committed up to ``position`` of ``source`` is written to
        every sink (read-your-writes); TimeoutError after ``timeout`` seconds. Works whether
        the sync runs in this process (woken by each commit) or in another one (polled)."""
        name = self._source(source).name
        deadline = time.monotonic() + timeout
        while await self._applied(name) < position:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"source {name!r}: position {position} not applied within "
                    f"{timeout:g}s (applied: {await self._applied(name)})"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._committed.wait(), min(remaining, 0.2))

    async def _applied(self, source: str) -> int:
        """The position of ``source`` fully applied, in its current capture epoch."""
        return await self.state.position(source, await self.sources[source].epoch())

    async def _require_capture(self, source: str, action: str) -> None:
        """Stop before changing anything when the source has no change capture installed:
        keys enqueued there would go nowhere."""
        if not await self.sources[source].epoch():
            raise ConfigError(
                f"source {source!r} has no change capture installed, so {action} cannot go "
                "through the sync path: run `vectorsync setup` first"
            )

    def _source(self, name: str | None) -> Source:
        if name is None and len(self.sources) == 1:
            return next(iter(self.sources.values()))
        if name not in self.sources:
            raise ConfigError(f"name a source: one of {', '.join(sorted(self.sources))}")
        return self.sources[name]

    def events(self, *, buffer: int = 10_000) -> EventStream:
        """Typed events (run started/finished, synced, dead-lettered, failed, inconsistent),
        from the moment of this call: ``async for event in engine.events(): ...``. A
        subscriber that falls ``buffer`` events behind loses the oldest (counted in
        ``events_dropped``) rather than slowing the sync. ``close()`` unsubscribes."""
        return EventStream(self._subscribers, buffer)

    def emit(self, event: Event) -> None:
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()
                self.events_dropped += 1
            queue.put_nowait(event)

    async def readiness(self, *, max_lag_seconds: float = 60.0) -> list[str]:
        """What keeps the engine from being ready: an unreachable source or sink, or a lag
        over the threshold. Empty when ready."""
        problems = []
        for name, source in self.sources.items():
            try:
                backlog = await source.backlog(await self._applied(name))
            except VectorsyncError as exc:
                problems.append(f"source {name!r}: {exc}")
                continue
            oldest = backlog.oldest_committed_at
            if oldest is not None and time.time() - oldest > max_lag_seconds:
                problems.append(
                    f"source {name!r}: lag {time.time() - oldest:.0f}s is over {max_lag_seconds:g}s"
                )
        for m in self.config.mappings:
            try:
                await self.sinks[m.sink].count(m.collection_name)
            except VectorsyncError as exc:
                problems.append(f"sink {m.sink!r}: {exc}")
        for name in self.sinks:
            problems.extend(await self._problems(name))
        return problems

    async def stats(self) -> dict[str, Any]:
        """Counters of this process's running workers plus what the state store knows
        (lag, dead letters, errors, last checks): what /metrics exports."""
        depth = {w.source.name: w.queue_depth() for w in self._workers}
        sources: dict[str, dict[str, Any]] = {}
        mappings: dict[str, dict[str, int]] = {m.name: {} for m in self.config.mappings}
        for name, source in self.sources.items():
            position = await self._applied(name)
            backlog = await source.backlog(position)
            oldest = backlog.oldest_committed_at
            st = self._stats[name]
            sources[name] = {
                "captured": st.captured,
                "position": position,
                "lag_changes": backlog.changes,
                "lag_seconds": 0.0 if oldest is None else max(0.0, time.time() - oldest),
                "queue_depth": depth.get(name, 0),
                "latency": st.latency,
                "batch_sizes": st.batch_sizes,
            }
            mappings.update({k: dict(v) for k, v in st.mappings.items()})
        figures = await self.state.statistics(hours=None)
        checks: dict[str, Any] = {}
        for c in await self.state.checks(limit=100):
            checks.setdefault(c["mapping"], c)
        embedders = {
            name: {
                "texts": e.texts_embedded,
                # what an API embedder counts (tokens sent, their cost, 429s waited out)
                **{
                    k: getattr(e, attr)
                    for k, attr in (
                        ("tokens", "tokens_used"),
                        ("truncated", "texts_truncated"),
                        ("rate_limited", "rate_limited"),
                        ("cost", "cost"),
                    )
                    if getattr(e, attr, None) is not None
                },
            }
            for name, e in self.embedders.items()
        }
        return {
            "sources": sources,
            "mappings": mappings,
            "embedders": embedders,
            "errors_by_type": figures["errors_by_type"],
            "dead_letters": figures["dead_letters_pending"],
            "checks": checks,
            "conflicts": await self.state.conflict_counts(),
            "scaleout": await self.scaleout_figures(),
        }

    async def scaleout_figures(self) -> dict[str, Any] | None:
        """Scale-out's holders and partitions (None without a [bus]; the bus's error while
        it is away)."""
        if self.config.bus is None:
            return None
        try:
            return (await self.scaleout_status()).as_dict()
        except RetryableError as exc:
            return {"error": str(exc)}

    async def targets(self) -> dict[str, tuple[int, int]]:
        """Per source: (applied position, head position)."""
        return {
            name: (await self._applied(name), await source.head())
            for name, source in self.sources.items()
        }

    async def status(self) -> list[MappingStatus]:
        result = []
        now = time.time()
        behind = await self.state.backlog_counts()
        for m in self.config.mappings:
            source = self.sources[m.source]
            position = await self._applied(m.source)
            backlog = await source.backlog(position)
            counts = await self.state.mapping_counts(m.name)
            oldest = backlog.oldest_committed_at
            result.append(
                MappingStatus(
                    mapping=m.name,
                    source=m.source,
                    sink=m.sink,
                    collection=m.collection_name,
                    position=position,
                    head=await source.head(),
                    lag_changes=backlog.changes,
                    lag_seconds=None if oldest is None else max(0.0, now - oldest),
                    lag_bytes=backlog.lag_bytes,
                    records=counts.records,
                    outdated=counts.outdated,
                    dead_letters=counts.dead_letters,
                    counters=counts.counters,
                    sink_problems=await self._problems(m.sink),
                    backlog=behind.get(m.name, 0),
                )
            )
        return result

    async def search(
        self,
        mapping: str,
        text: str,
        limit: int = 5,
        *,
        where: Where | None = None,
        vector: str | None = None,
        hybrid: bool = False,
    ) -> list[Hit]:
        """Semantic search in a mapping's live collection (the query embedded with the
        mapping's embedder); ``where`` filters on payload fields, e.g. ``{"author": "ann",
        "published": {">=": 2025}}`` or ``["author=ann", "published>=2025"]``; ``vector``
        names the vector searched where the mapping has several (default: the first);
        ``hybrid`` fuses its hits with the mapping's sparse vector's (reciprocal rank)."""
        m = self.mapping(mapping)
        fields = {name: index_type_for(self._columns[m.name][name]) for name in m.payload}
        filters = conditions(m.name, where, fields)
        embedder, sink, collection = await self.reader(m)
        return await nearest(
            m.name, embedder, sink, collection, text, limit, filters, vector, hybrid
        )

    async def maintain(self, mapping: str | None = None) -> list[dict[str, Any]]:
        """Each mapping's (or ``mapping``'s) sink housekeeping on its live collection:
        what the sink did (``actions``; None where its kind has no housekeeping) and the
        collection's size before and after, where the sink can tell it."""
        names = [self.mapping(mapping).name] if mapping else [m.name for m in self.config.mappings]
        report = []
        for name in names:
            m = self.mapping(name)
            _, sink, collection = await self.reader(m)
            before = await _size(sink, collection)
            actions = await sink.maintain(collection) if isinstance(sink, Maintained) else None
            logger.info(
                "maintained %s: %s",
                collection,
                "; ".join(actions or ()) or "nothing to do",
                extra={"action": "maintain", "mapping": name, "sink": m.sink},
            )
            report.append(
                {
                    "mapping": name,
                    "sink": m.sink,
                    "kind": self.config.sinks[m.sink].kind,
                    "collection": collection,
                    "actions": actions,
                    "size_before": before,
                    "size_after": await _size(sink, collection),
                }
            )
        return report

    async def collection_sizes(self) -> dict[str, int]:
        """Bytes each mapping's live collection takes in its sink, where the sink can tell
        (what /metrics exports as vectorsync_collection_size_bytes)."""
        sizes = {}
        for m in self.config.mappings:
            sink = self.sinks[m.sink]
            if not isinstance(sink, Sized):
                continue
            try:
                _, _, collection = await self.reader(m)
                size = await sink.collection_size(collection)
            except VectorsyncError as exc:  # a scrape must not fail for one sink
                logger.warning("no size for %s: %s", m.name, exc, extra={"action": "size"})
                continue
            if size is not None:
                sizes[m.name] = size
        return sizes

    async def reader(self, m: MappingConfig) -> tuple[Embedder, Sink, str]:
        """What a search of ``m`` needs: the live index version's embedder (its own model,
        which during a re-index is not the configured one yet) and physical collection.
        Opened once per engine; no capture is installed, and an unreachable sink fails at
        once."""
        async with self._prepare_lock:
            await self._open_sinks()
            sink = self.sinks[m.sink]
            for runtime in self._runtimes or ():
                if runtime.config.name == m.name and runtime.name == m.name:  # the live one
                    return runtime.embedder, sink, runtime.collection
            embedder = self.embedders[m.embedder]
            if embedder not in self._opened:
                await embedder.open()
                self._opened.append(embedder)
            versions = await self.state.index_versions(m.name)
            live = next((v for v in versions if v.state == "live"), None)
            if live is not None:
                made = await self.index.embedder_for(m, live)
                if made is not None:
                    await sink.ensure_collection(
                        CollectionSpec(
                            name=live.collection,
                            dimension=made.dimension,
                            distance=made.distance,
                            vectors=stored_layout(live.definition) or layout_of(made),
                        )
                    )
                    return made, sink, live.collection
            spec = CollectionSpec(
                name=m.collection_name,
                dimension=embedder.dimension,
                distance=embedder.distance,
                vectors=layout_for(m, embedder),
            )
            await sink.ensure_collection(spec)
        return embedder, sink, m.collection_name

    # -- index versions (see index/) ---------------------------------------------------
    async def indexes(self, mapping: str | None = None) -> list[dict[str, Any]]:
        """Every index version (of ``mapping``, or all): version, collection, state
        (building, live, previous, dropped), records, model, dimension, times, backfill."""
        if mapping is not None:
            self.mapping(mapping)
        return await self.index.listing(mapping)

    async def reindex(
        self,
        mapping: str,
        *,
        dry_run: bool = False,
        rollback: bool = False,
        on_batch: Callable[[BatchReport], None] | None = None,
    ) -> dict[str, Any]:
        """Build ``mapping``'s configured index version beside the live one, verify it and
        swap it live (``run --once`` semantics: returns when it is live); ``dry_run``: what
        that would cost, changing nothing; ``rollback``: make the previous version live."""
        m = self.mapping(mapping)
        if dry_run:
            return await self.index.dry_run(m)
        if self._running:
            raise ConfigError(
                f"mapping {m.name!r}: this engine is syncing; a re-index it starts runs in "
                'that sync (set sync.reindex = "auto") — stop it to re-index by hand'
            )
        await self._take_leases()
        try:
            await self._open_sinks()
            if rollback:
                version = await self.index.rollback(m)
                self._runtimes = None  # searches read the version live now
                return {"mapping": m.name, "live": version.version, "rolled_back": True}
            building = await self.index.start_build(m)
        finally:
            await self._release_leases()
        self._runtimes = None  # the targets change: prepare them again
        result = await self.run(once=True, on_batch=on_batch)
        return {"mapping": m.name, "live": building.version, "run": result.run_id}

    async def texts(
        self, mapping: str, keys: Sequence[Key], *, text: str | None = None
    ) -> dict[Key, str]:
        """The current text of records, rendered from their rows as the sync renders it
        (what a search hit is about), with the mapping's template or ``text``; keys whose
        row is gone or cannot render are left out."""
        m = self.mapping(mapping)
        if text is not None and text != m.text:
            m = m.model_copy(update={"text": text})
        rows = await self.sources[m.source].fetch(m.table, m.key, list(keys))
        resolve = self.resolver(m)
        if resolve is not None and rows:
            await resolve(rows)
        renderer = Renderer(m, self.index_types(m))
        found: dict[Key, str] = {}
        for key, row in rows.items():
            with contextlib.suppress(VectorsyncError):
                found[key] = renderer.render(row).text
        return found
