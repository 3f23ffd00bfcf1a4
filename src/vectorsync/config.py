"""Configuration: parsed once at the edge from ``vectorsync.toml`` plus env overrides.

Config objects are frozen pydantic models that carry no behaviour; the composition root
(:mod:`vectorsync.engine`) turns them into adapters.

Env overrides: ``VECTORSYNC_<SECTION>__<NAME>__<FIELD>=value`` replaces one value of the
file, e.g. ``VECTORSYNC_STATE__URL`` or ``VECTORSYNC_SOURCES__APP__PATH``. Values are parsed
as TOML scalars when they parse (``10``, ``true``, ``"x"``), else taken as strings.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    model_validator,
)

from .errors import ConfigError

__all__ = [
    "CONFIG_ENV",
    "ChromaSinkConfig",
    "ChunkingConfig",
    "Config",
    "EdgeConfig",
    "EmbedderConfig",
    "FalkorDBSinkConfig",
    "FalkorDBSourceConfig",
    "HashEmbedderConfig",
    "HttpConfig",
    "MappingConfig",
    "Model2VecEmbedderConfig",
    "Neo4jSinkConfig",
    "Neo4jSourceConfig",
    "PgvectorSinkConfig",
    "PostgresSourceConfig",
    "QdrantEdgeSinkConfig",
    "QdrantSinkConfig",
    "RelatedConfig",
    "SentenceTransformersEmbedderConfig",
    "SinkConfig",
    "SourceConfig",
    "SparseEmbedderConfig",
    "SqliteSourceConfig",
    "StateConfig",
    "SurrealDBSourceConfig",
    "SyncConfig",
    "load_config",
    "parse_config",
]

CONFIG_ENV = "VECTORSYNC_CONFIG"
ENV_PREFIX = "VECTORSYNC_"


CHUNKED_TEXT_LIMIT = 10_000_000  # characters of a chunked mapping's text, by default
NAMED_EMBEDDER = "vectors:"  # + the mapping's name: the embedder of a mapping with vectors
_PAYLOAD_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_COLLECTION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StateConfig(_Frozen):
    url: str = "sqlite:///.vectorsync/state.db"
    embedding_cache: bool = True
    retention_days: float = Field(
        default=30, gt=0, description="history kept: runs, resolved errors and dead letters"
    )


class SqliteSourceConfig(_Frozen):
    kind: Literal["sqlite"]
    path: Path
    poll_interval: float = Field(
        default=0.2, gt=0, description="seconds between outbox polls when idle"
    )


class PostgresSourceConfig(_Frozen):
    kind: Literal["postgres"]
    url: str = Field(description="postgresql://user:password@host:port/database")
    capture: Literal["logical", "outbox"] | None = Field(
        default=None,
        description="logical replication (default where wal_level = logical) or a trigger outbox",
    )
    slot: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9_]{1,63}$",
        description="name of the replication slot, publication and outbox "
        "(default vectorsync_<source name>)",
    )
    poll_interval: float = Field(
        default=1.0, gt=0, description="longest wait for a change notification when idle"
    )
    heartbeat_interval: float = Field(
        default=10.0, gt=0, description="seconds between slot heartbeats (logical capture)"
    )

    @model_validator(mode="after")
    def _postgres_url(self) -> PostgresSourceConfig:
        if not self.url.startswith(("postgresql://", "postgres://")):
            raise ValueError("url must start with postgresql:// (e.g. postgresql://user@host/db)")
        return self


class _GraphSourceConfig(_Frozen):
    capture: Literal["outbox", "poll"] = Field(
        default="outbox",
        description="outbox: changes written through vectorsync's graph writer (same "
        "transaction); poll: nodes whose version_property grew (external writers)",
    )
    version_property: str = Field(
        default="updated_at",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="poll: an integer property every writer sets to timestamp() on change",
    )
    poll_interval: float = Field(default=0.2, gt=0, description="seconds between polls")
    poll_grace: float = Field(
        default=1.0,
        ge=0,
        description="poll: versions newer than this many seconds are read at the next poll "
        "(writers in the same millisecond may still be committing)",
    )


class FalkorDBSourceConfig(_GraphSourceConfig):
    kind: Literal["falkordb"]
    url: str = Field(
        default="redis://127.0.0.1:6379", description="redis://[:password@]host:port of FalkorDB"
    )
    graph: str = Field(min_length=1, description="the graph's name (GRAPH.QUERY key)")

    @model_validator(mode="after")
    def _redis_url(self) -> FalkorDBSourceConfig:
        if not self.url.startswith(("redis://", "rediss://", "falkor://", "unix://")):
            raise ValueError("url must start with redis:// (e.g. redis://127.0.0.1:6379)")
        return self


class Neo4jSourceConfig(_GraphSourceConfig):
    kind: Literal["neo4j"]
    capture: Literal["outbox", "poll"] = Field(
        default="poll", description="Neo4j is read by polling version_property"
    )
    url: str = Field(description="bolt://host:7687 or neo4j://host:7687")
    user: str = "neo4j"
    password: SecretStr | None = None
    database: str | None = Field(default=None, description="default: the server's default")


_DURATION = re.compile(r"^([0-9]+(ns|us|µs|ms|s|m|h|d|w|y))+$")


class SurrealDBSourceConfig(_Frozen):
    kind: Literal["surrealdb"]
    url: str = Field(
        description="ws://host:8000 or wss://… (a server), or mem:// / surrealkv://path (an "
        "embedded engine: the application hands its open connection to Engine.open)"
    )
    namespace: str = Field(min_length=1)
    database: str = Field(min_length=1)
    username: str | None = Field(default=None, description="signin user (servers)")
    password: SecretStr | None = None
    retention: str = Field(
        default="7d",
        description="how long the change feeds keep changes (a SurrealDB duration); a pause "
        "longer than this is answered with a re-snapshot",
    )
    beat_interval: float = Field(
        default=60.0, gt=0, description="seconds between feed witnesses written when idle"
    )
    poll_interval: float = Field(default=0.2, gt=0, description="seconds between feed polls")

    @model_validator(mode="after")
    def _surreal_url(self) -> SurrealDBSourceConfig:
        schemes = ("ws://", "wss://", "mem://", "surrealkv://")
        if not self.url.startswith(schemes):
            raise ValueError(
                "url must start with ws://, wss://, mem:// or surrealkv:// (e.g. "
                'url = "ws://127.0.0.1:8000" or url = "surrealkv://data/kb")'
            )
        if not _DURATION.fullmatch(self.retention):
            raise ValueError(
                f'retention {self.retention!r}: write a SurrealDB duration, e.g. "7d" or "12h"'
            )
        if self.password is not None and self.username is None:
            raise ValueError("password without username: set username too")
        return self


SourceConfig = Annotated[
    SqliteSourceConfig
    | PostgresSourceConfig
    | FalkorDBSourceConfig
    | Neo4jSourceConfig
    | SurrealDBSourceConfig,
    Field(discriminator="kind"),
]
GRAPH_SOURCES = (FalkorDBSourceConfig, Neo4jSourceConfig)
# records need not hold every field: one a record lacks reads as NULL
SCHEMALESS_SOURCES = (*GRAPH_SOURCES, SurrealDBSourceConfig)


class QdrantEdgeSinkConfig(_Frozen):
    kind: Literal["qdrant-edge"]
    path: Path = Path(".vectorsync/qdrant")
    min_free_space: int = Field(
        default=256,
        ge=0,
        description="MiB that must stay free under path: below it each write fails as a "
        "retryable sink error (qdrant-edge writes through mmap, so a full disk would kill "
        "the process); keep it over the largest write: about 4 MiB per 1,000 384-d points, "
        "about 40 MiB to open a new collection; 0 disables the check",
    )


class QdrantSinkConfig(_Frozen):
    kind: Literal["qdrant"]
    url: str | None = None
    path: str | None = Field(default=None, description='a folder, or ":memory:"')
    api_key: SecretStr | None = None
    timeout: float = 30.0

    @model_validator(mode="after")
    def _one_location(self) -> QdrantSinkConfig:
        if (self.url is None) == (self.path is None):
            raise ValueError(
                'set exactly one of url (a Qdrant server) or path (a folder or ":memory:")'
            )
        return self


class PgvectorSinkConfig(_Frozen):
    kind: Literal["pgvector"]
    url: str = Field(description="postgresql://user:password@host:port/database with pgvector")
    schema_name: str = Field(
        default="vectors",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$",
        description="the schema of the collection tables and alias views (created if missing)",
    )
    hnsw: bool = Field(
        default=True,
        description="an HNSW index per collection (approximate search); false: exact search, "
        "faster bulk loads",
    )
    payload_index: bool = Field(
        default=True,
        description="a GIN index on the payload for filters; false: payload-only updates "
        "are HOT updates that touch no index (the HNSW graph included), many times faster",
    )

    @model_validator(mode="after")
    def _pgvector_url(self) -> PgvectorSinkConfig:
        if not self.url.startswith(("postgresql://", "postgres://")):
            raise ValueError("url must start with postgresql:// (e.g. postgresql://user@host/db)")
        if self.schema_name == "vectorsync":
            raise ValueError(
                'schema "vectorsync" belongs to the PostgreSQL source (its teardown drops it); '
                'use another, e.g. schema_name = "vectors"'
            )
        return self


class ChromaSinkConfig(_Frozen):
    kind: Literal["chroma"]
    path: Path | None = Field(default=None, description="a folder: Chroma embedded")
    url: str | None = Field(default=None, description="a Chroma server, e.g. http://localhost:8000")
    timeout: float = Field(default=30.0, gt=0, description="seconds per request to the server")

    @model_validator(mode="after")
    def _one_location(self) -> ChromaSinkConfig:
        if (self.url is None) == (self.path is None):
            raise ValueError(
                "set exactly one of path (a folder: Chroma embedded in this process) or url "
                "(a Chroma server, e.g. http://localhost:8000)"
            )
        if self.url is not None:
            parts = urlsplit(self.url)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/"):
                raise ValueError(
                    f"url {self.url!r} is not a Chroma server address; use "
                    "http://host:port (or https://)"
                )
        return self


class FalkorDBSinkConfig(_Frozen):
    kind: Literal["falkordb"]
    url: str = Field(
        default="redis://127.0.0.1:6379", description="redis://[:password@]host:port of FalkorDB"
    )
    graph: str = Field(
        default="vectorsync",
        min_length=1,
        description="the graph the collections' nodes go into (a label per collection); "
        "give the sink a graph of its own, not a source's",
    )
    timeout: float = Field(
        default=60.0, gt=0, description="seconds a query may take before it is retried"
    )

    @model_validator(mode="after")
    def _redis_url(self) -> FalkorDBSinkConfig:
        if not self.url.startswith(("redis://", "rediss://", "falkor://", "unix://")):
            raise ValueError("url must start with redis:// (e.g. redis://127.0.0.1:6379)")
        return self


class Neo4jSinkConfig(_Frozen):
    kind: Literal["neo4j"]
    url: str = Field(description="bolt://host:7687 or neo4j://host:7687")
    user: str = "neo4j"
    password: SecretStr | None = None
    database: str | None = Field(default=None, description="default: the server's default")


GRAPH_SINKS = (FalkorDBSinkConfig, Neo4jSinkConfig)

SinkConfig = Annotated[
    QdrantEdgeSinkConfig
    | QdrantSinkConfig
    | ChromaSinkConfig
    | PgvectorSinkConfig
    | FalkorDBSinkConfig
    | Neo4jSinkConfig,
    Field(discriminator="kind"),
]


class SentenceTransformersEmbedderConfig(_Frozen):
    kind: Literal["sentence-transformers"]
    model: str | None = Field(
        default=None, description="a local model folder; default: bundled MiniLM"
    )
    batch_size: int = Field(default=8, gt=0, description="texts per model call")
    threads: int = Field(default=1, gt=0, description="torch threads per model call")
    concurrency: int | None = Field(
        default=None, gt=0, description="model calls at once; default: one per CPU core"
    )
    normalize: bool = True
    device: Literal["cpu", "cuda", "auto"] = Field(
        default="cpu",
        description='where the model runs; "auto": a CUDA GPU when torch sees one, else cpu',
    )


class Model2VecEmbedderConfig(_Frozen):
    """A static model2vec model: a folder made by ``vectorsync models distill``."""

    kind: Literal["model2vec"]
    path: Path = Field(description="a model2vec model folder (relative to the config's folder)")
    batch_size: int = Field(default=1024, gt=0, description="texts per model call")


class SparseEmbedderConfig(_Frozen):
    """Sparse vectors (term frequencies over a tokenizer; the sink weighs terms by IDF) for
    hybrid search: only as a vector of [[mappings.vectors]], beside a dense one."""

    kind: Literal["sparse"]
    tokenizer: str | None = Field(
        default=None,
        description="a model folder with tokenizer.json; default: the bundled MiniLM's",
    )


class HashEmbedderConfig(_Frozen):
    kind: Literal["hash"]
    dimension: int = Field(default=384, gt=0)
    batch_size: int = Field(default=256, gt=0)


class OpenAIEmbedderConfig(_Frozen):
    """Any OpenAI-compatible ``/v1/embeddings`` endpoint (OpenAI, Azure, Ollama, vLLM, TEI,
    LiteLLM, Infinity)."""

    kind: Literal["openai"]
    url: str = Field(
        default="https://api.openai.com/v1", description="the API base URL (ending in /v1)"
    )
    model: str = Field(description="the model name the endpoint serves")
    api_key: SecretStr | None = Field(default=None, description="the key, if given here")
    api_key_env: str | None = Field(
        default=None, description="the environment variable holding the key (instead of api_key)"
    )
    dimensions: int | None = Field(
        default=None, gt=0, description="ask for shorter vectors (models that can shorten)"
    )
    batch_size: int = Field(default=64, gt=0, description="texts per request")
    max_batch_tokens: int = Field(default=300_000, gt=0, description="tokens per request")
    max_input_tokens: int | None = Field(
        default=None, gt=0, description="the model's window in tokens; unset: not checked"
    )
    truncate: Literal["model", "error"] = Field(
        default="model",
        description='a text over max_input_tokens: "model" cuts it (counted), "error" '
        "dead-letters it",
    )
    requests_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(default=None, gt=0)
    concurrency: int = Field(default=4, gt=0, description="requests in flight at once")
    timeout: float = Field(default=60.0, gt=0, description="seconds per request")
    price_per_million_tokens: float | None = Field(
        default=None, ge=0, description="for cost estimates and counts"
    )
    tokenizer: str | None = Field(
        default=None,
        description="a folder with the model's tokenizer.json to count tokens; unset: "
        "tiktoken for OpenAI models, else 4 characters a token",
    )

    @model_validator(mode="after")
    def _one_key(self) -> OpenAIEmbedderConfig:
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("set api_key or api_key_env, not both")
        return self


EmbedderConfig = Annotated[
    SentenceTransformersEmbedderConfig
    | Model2VecEmbedderConfig
    | HashEmbedderConfig
    | OpenAIEmbedderConfig
    | SparseEmbedderConfig,
    Field(discriminator="kind"),
]


class EmbedderByConfig(_Frozen):
    """A model per kind of record: the value of ``field`` picks the embedder."""

    field: str = Field(description="the row's field whose value picks the embedder")
    map: dict[str, str] = Field(
        min_length=1,
        description='value → embedder name; "default" names the embedder of every other '
        "value (else the mapping's embedder)",
    )


class VectorConfig(_Frozen):
    """One named vector of a mapping's points (see docs/vectors.md)."""

    name: str = Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_\-]*$",
        description="the vector's name in the sink; the first is the default for search",
    )
    embedder: str = "default"
    text: str = Field(min_length=1, description="Jinja2 template over the row")


class RelatedConfig(_Frozen):
    """Fields pulled from related records: a join (SQL sources) or a pattern (graphs)."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    table: str | None = Field(default=None, description="SQL: the related table")
    on: dict[str, str] | None = Field(
        default=None,
        description='SQL: {related column = "mapped table column"}, e.g. { id = "doc_id" }',
    )
    pattern: str | None = Field(
        default=None,
        description="graph: a Cypher pattern from the mapped node, e.g. "
        '"(d:Document)-[:HAS_CHUNK]->(c)"; SurrealDB: a one-hop graph path from the mapped '
        'record, e.g. "<-mentions<-entity"',
    )
    key: str = Field(default="id", description="the related table's key column / property")
    fields: dict[str, str] = Field(
        min_length=1,
        description="output name = related column (SQL) or Cypher expression (e.g. d.title)",
    )
    many: bool = Field(
        default=False, description="lists of every related record's values (else the first's)"
    )

    @model_validator(mode="after")
    def _one_way(self) -> RelatedConfig:
        if (self.pattern is None) == (self.table is None):
            raise ValueError(
                "set either pattern (graph sources) or table and on (SQL sources), not both"
            )
        if self.table is not None and (self.on is None or len(self.on) != 1):
            raise ValueError(
                'a SQL relation needs on = { <related column> = "<mapped table column>" }'
            )
        return self


class EdgeConfig(_Frozen):
    """A relationship from each node of the mapping to the node(s) whose key a payload field
    holds (graph sinks: see docs/sinks.md#relationships)."""

    type: str = Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="the relationship type, e.g. WRITTEN_BY"
    )
    field: str = Field(
        description="a payload field (a column or a related field) holding the target's key, "
        "or a list of keys (a related field with many = true)"
    )
    to: str | None = Field(
        default=None,
        description="the mapping whose nodes are the targets (written to the same sink); "
        "matched on their _vs_key",
    )
    label: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="instead of to: a label of your own; the target (:<label> {<key>: value}) "
        "is merged",
    )
    key: str = Field(
        default="id",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="with label: the target's key property",
    )

    @model_validator(mode="after")
    def _one_target(self) -> EdgeConfig:
        if (self.to is None) == (self.label is None):
            raise ValueError(
                f"edge {self.type!r}: set either to (a mapping synced to the same sink) or "
                "label (nodes of your own, merged by key), not both"
            )
        return self


class ChunkingConfig(_Frozen):
    """A record's text cut into chunks, each its own point (see docs/chunking.md)."""

    splitter: Literal["recursive", "markdown", "sentences"] = Field(
        default="recursive",
        description="recursive: paragraphs, then sentences, then words; markdown: also "
        "headings, lists and code blocks; sentences: whole sentences packed up to size",
    )
    size: int = Field(default=256, gt=0, description="the most a chunk holds, in unit")
    overlap: int = Field(default=0, ge=0, description="how much of a chunk's end the next repeats")
    unit: Literal["tokens", "chars"] = Field(
        default="tokens",
        description="tokens of the mapping's embedder (its tokenizer.json; 4 characters a "
        "token when it has none) or characters",
    )
    store_text: bool = Field(default=False, description="store each chunk's text as chunk_text")

    @model_validator(mode="after")
    def _overlap_below_size(self) -> ChunkingConfig:
        if self.overlap >= self.size:
            raise ValueError(
                f"chunking overlap ({self.overlap}) must be smaller than size ({self.size})"
            )
        return self


class MappingConfig(_Frozen):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_\-]*$")
    source: str
    table: str = Field(default="", description="the table (SQL) or node label (graph)")
    match: str | None = Field(
        default=None, description='graph: the mapped nodes, e.g. "(c:DocumentChunk)"'
    )
    key: str = "id"
    text: str = Field(
        default="", description="Jinja2 template over the row (or vectors, for several)"
    )
    payload: tuple[str, ...] = ()
    sink: str = Field(default="", description="the sink it writes (or sinks, for several)")
    sinks: tuple[str, ...] = Field(
        default=(),
        description="several sinks, each kept in step on its own: the mapping runs as one "
        "copy per sink, named <mapping>.<sink> after the first (see docs/sinks.md)",
    )
    collection: str | None = Field(
        default=None, description="default: the mapping's name (letters, digits, _ . -)"
    )
    embedder: str = "default"
    max_text_length: int = Field(
        default=20_000,
        gt=0,
        description="rendered text longer than this many characters is cut to it "
        '(long_text = "truncate") or dead-lettered (long_text = "dead_letter")',
    )
    long_text: Literal["truncate", "dead_letter"] = Field(
        default="truncate",
        description="what happens to text over max_text_length: embedded cut to it (counted "
        "as truncated, logged once) or the record dead-lettered",
    )
    related: tuple[RelatedConfig, ...] = ()
    edges: tuple[EdgeConfig, ...] = Field(
        default=(), description="graph sinks: relationships from payload fields' keys"
    )
    chunking: ChunkingConfig | None = Field(
        default=None, description="cut the text into chunks, one point each"
    )
    embedder_by: EmbedderByConfig | None = Field(
        default=None,
        description="a model per kind of record: each embedder chosen runs as a copy of the "
        "mapping with its own collection, named <mapping>.<embedder> after the first",
    )
    conflicts: Literal["source_wins", "latest_wins", "merge", "keep_both"] = Field(
        default="source_wins",
        description="a payload field or vector edited in the sink by someone else: "
        "source_wins overwrites it (nothing extra read); latest_wins keeps the newer side by "
        "conflict_timestamp; merge keeps what only the sink changed; keep_both keeps a "
        "foreign vector as the named vector 'foreign' beside the source's (Qdrant sinks; "
        "payload fields as source_wins) (docs/conflicts.md)",
    )
    conflict_timestamp: str | None = Field(
        default=None, description="latest_wins: the payload field that says which side is newer"
    )
    merge_tie: Literal["source", "sink"] = Field(
        default="source", description="merge: who wins a field both sides changed"
    )
    write_back: bool = Field(
        default=False,
        description="write the sink values a policy keeps back to the source row (SQL "
        "sources; the table's own columns)",
    )
    vectors: tuple[VectorConfig, ...] = Field(
        default=(),
        description="several named vectors per point, each with its own embedder and text, "
        "each embedded only when its own text changes (instead of text and embedder)",
    )

    _family: str | None = PrivateAttr(default=None)
    # a copy of an embedder_by mapping: (field, values, negate) — the rows it holds
    _select: tuple[str, frozenset[str], bool] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _table_or_match(self) -> MappingConfig:
        if bool(self.sink) == bool(self.sinks):
            raise ValueError(
                'name the sink it writes: sink = "vectors", or sinks = ["vectors", "graph"] '
                "for several (not both)"
            )
        if len(set(self.sinks)) != len(self.sinks):
            raise ValueError(f"sinks {list(self.sinks)} names a sink twice")
        if self.embedder_by is not None and self.sinks:
            raise ValueError(
                "embedder_by and several sinks cannot be combined yet: declare one mapping per sink"
            )
        self._named_vectors()
        self._conflict_policy()
        if self.match is not None:
            from .related import node_pattern

            _, label = node_pattern(self.match)
            if self.table and self.table != label:
                raise ValueError(f"table {self.table!r} and match label {label!r} differ")
            object.__setattr__(self, "table", label)
        if not self.table:
            raise ValueError('set table (SQL sources) or match (graphs, e.g. "(c:Chunk)")')
        for field in self.payload:
            if not _PAYLOAD_KEY.match(field) or field.startswith("_vs_"):
                raise ValueError(
                    f"payload field {field!r} cannot be a vector-store payload key: use letters, "
                    "digits, _ and - (not starting with _vs_, which is reserved); rename the "
                    "column, or select it under another name in a view"
                )
        if self.chunking is not None:
            from .chunking import CHUNK_FIELDS

            taken = sorted(set(self.payload) & set(CHUNK_FIELDS))
            if taken:
                raise ValueError(
                    f"payload field(s) {', '.join(taken)} would be overwritten by each chunk's "
                    "own: select the column under another name"
                )
        if self.collection is not None and not _COLLECTION.match(self.collection):
            raise ValueError(
                f"collection {self.collection!r}: use 1-255 letters, digits, _ . - (it names a "
                "folder in embedded sinks: no path separators, no leading dot)"
            )
        from .related import edge_path

        outputs: set[str] = set()
        for rel in self.related:
            if rel.pattern is not None and self.match is None and edge_path(rel.pattern) is None:
                raise ValueError(
                    f"related {rel.name!r} uses a pattern: name the mapped nodes with match, "
                    'e.g. match = "(c:DocumentChunk)" (or, on SurrealDB, write a graph path '
                    'from the mapped record, e.g. pattern = "<-mentions<-entity")'
                )
            for field in rel.fields:
                if field in outputs:
                    raise ValueError(f"related field {field!r} is declared twice")
                outputs.add(field)
        for edge in self.edges:
            if edge.field not in self.payload:
                raise ValueError(
                    f"edge {edge.type!r}: field {edge.field!r} is not in payload; add it to "
                    "payload (the sink reads the keys from there)"
                )
        return self

    def _named_vectors(self) -> None:
        """With ``vectors``, the mapping's text is theirs, joined (see embed.named), and its
        embedder the one that makes them all (named ``vectors:<mapping>``)."""
        if not self.vectors:
            if not self.text:
                raise ValueError(
                    'set text (a template over the row, e.g. text = "{{ title }}") or '
                    "vectors (several named vectors)"
                )
            return
        if self.embedder.startswith(NAMED_EMBEDDER):
            return  # a copy (per_sink) of a mapping with vectors: made already
        from .embed.named import SEPARATOR

        if self.text or "embedder" in self.model_fields_set:
            raise ValueError(
                "a mapping with vectors sets text and embedder per vector: remove its text "
                "and embedder"
            )
        names = [v.name for v in self.vectors]
        if len(set(names)) != len(names):
            raise ValueError(f"vectors {names} names a vector twice")
        for other, what in (
            (self.chunking, "chunking"),
            (self.embedder_by, "embedder_by"),
        ):
            if other is not None:
                raise ValueError(f"vectors and {what} cannot be combined yet")
        object.__setattr__(self, "text", SEPARATOR.join(v.text for v in self.vectors))
        object.__setattr__(self, "embedder", NAMED_EMBEDDER + self.name)

    def _conflict_policy(self) -> None:
        if self.conflicts == "latest_wins":
            if self.conflict_timestamp is None:
                raise ValueError(
                    'conflicts = "latest_wins" compares a timestamp: name its payload field, '
                    'e.g. conflict_timestamp = "updated_at"'
                )
            if self.conflict_timestamp not in self.payload:
                raise ValueError(
                    f"conflict_timestamp {self.conflict_timestamp!r} is not in payload; add "
                    "it to payload (both sides are compared on it)"
                )
        if self.conflicts != "source_wins" and self.chunking is not None:
            raise ValueError(f'conflicts = "{self.conflicts}" and chunking cannot be combined yet')
        if self.write_back and self.conflicts in ("source_wins", "keep_both"):
            raise ValueError(
                'write_back carries sink edits a policy keeps: set conflicts = "merge" or '
                f'"latest_wins" with it ({self.conflicts} keeps no payload field)'
            )
        if self.conflicts == "keep_both" and self.vectors:
            raise ValueError(
                'conflicts = "keep_both" and named vectors ([[mappings.vectors]]) cannot be '
                'combined yet: use conflicts = "merge" or "latest_wins" with them'
            )

    @property
    def embedders_used(self) -> tuple[str, ...]:
        """The configured embedders the mapping's vectors are made with."""
        if self.vectors:
            return tuple(dict.fromkeys(v.embedder for v in self.vectors))
        return (self.embedder,)

    @property
    def collection_name(self) -> str:
        return self.collection or self.name

    @property
    def family(self) -> str:
        """The mapping as configured: a mapping with several sinks runs as one copy per
        sink, and every copy derives its point ids from this name (the same record has the
        same id in every sink)."""
        return self._family or self.name

    def selects(self, row: Mapping[str, Any]) -> bool:
        """Whether this mapping holds ``row`` (always, but for the copies of an
        ``embedder_by`` mapping: the rows whose field picks its embedder)."""
        held = self.row_filter
        return held is None or held(row)

    @property
    def row_filter(self) -> Callable[[Mapping[str, Any]], bool] | None:
        """``selects`` where some rows are another copy's, None where the mapping holds
        every row of its table. Take it once per batch: it reads no private attribute per
        row (pydantic's are several times slower to read than a local)."""
        if self._select is None:
            return None
        field, values, negate = self._select

        def selects(row: Mapping[str, Any]) -> bool:
            value = row.get(field)
            return (value is not None and str(value) in values) != negate

        return selects

    def per_embedder(self) -> list[MappingConfig]:
        """The mapping as it runs: itself; for ``embedder_by``, a copy per embedder chosen
        — the fallback one (``map.default``, else ``embedder``) keeps the mapping's name and
        collection and holds every row no other value picks; the others are named
        ``<mapping>.<embedder>`` and write ``<collection>_<embedder>``. A row whose field
        changes moves from one copy's collection to the other's."""
        by = self.embedder_by
        if by is None:
            return [self]
        fallback = by.map.get("default", self.embedder)
        chosen: dict[str, set[str]] = {}
        for value, embedder in by.map.items():
            if value != "default" and embedder != fallback:
                chosen.setdefault(embedder, set()).add(value)
        others = frozenset(v for values in chosen.values() for v in values)
        first = self.model_copy(update={"embedder": fallback, "embedder_by": None})
        first._family, first._select = self.name, (by.field, others, True)
        out = [first]
        for embedder, values in chosen.items():
            copy = self.model_copy(
                update={
                    "name": f"{self.name}.{embedder}",
                    "embedder": embedder,
                    "embedder_by": None,
                    "collection": f"{self.collection_name}_{embedder}",
                }
            )
            copy._family, copy._select = self.name, (by.field, frozenset(values), False)
            out.append(copy)
        return out

    def per_sink(self) -> list[MappingConfig]:
        """The mapping as it runs: itself for one sink; for ``sinks = [a, b, …]``, a copy
        per sink — the first keeps the mapping's name (its state and collection stay valid
        when sinks are added), the others are named ``<mapping>.<sink>``, each with its own
        record state, index versions, checks and backlog."""
        if not self.sinks:
            return [self]
        out = []
        for i, sink in enumerate(self.sinks):
            name = self.name if i == 0 else f"{self.name}.{sink}"
            copy = self.model_copy(
                update={
                    "name": name,
                    "sink": sink,
                    "sinks": (),
                    "collection": self.collection_name,
                }
            )
            copy._family = self.name
            out.append(copy)
        return out

    @property
    def text_limit(self) -> int:
        """The most characters of rendered text synced: ``max_text_length``; a chunked
        mapping embeds chunks, not the whole text, so there its default is 10,000,000."""
        if self.chunking is not None and "max_text_length" not in self.model_fields_set:
            return CHUNKED_TEXT_LIMIT
        if self.vectors:  # each vector's text is cut to it (embed.named)
            return (self.max_text_length + 1) * len(self.vectors)
        return self.max_text_length


class SyncConfig(_Frozen):
    batch_size: int = Field(default=1000, gt=0, description="changes read from a source per batch")
    max_in_flight: int = Field(
        default=2, gt=0, description="batches between capture, embedding and writes"
    )
    reindex: Literal["auto", "manual"] = Field(
        default="auto",
        description="auto: a change of model, dimension, distance or template builds the next "
        "index version beside the live one and swaps when it is verified; manual: only "
        "`vectorsync reindex` does (the mapping shows as outdated meanwhile)",
    )
    keep_previous: str = Field(
        default="24h",
        description="how long the previous index version is kept (and maintained) after a "
        "swap, for `vectorsync reindex --rollback`: 24h, 30m, 90s, 2d",
    )
    sink_outage_after: float = Field(
        default=5.0,
        gt=0,
        description="a mapping with several sinks: seconds a sink's writes may fail before its "
        "records are left in its backlog (caught up from the source when it is back) so the "
        "other sinks go on",
    )


class BusConfig(_Frozen):
    """Scale-out mode (``vectorsync capture`` + ``vectorsync worker``): the change bus."""

    kind: Literal["redis", "kafka"] = "redis"
    url: str = Field(
        pattern=r"^(redis|rediss|unix|kafka)://",
        description="Redis Streams: redis://127.0.0.1:6379/0 (appendonly yes, appendfsync "
        "always); kafka: kafka://host:9092[,host2:9092] (the Kafka protocol, aiokafka)",
    )
    partitions: int = Field(
        default=8, ge=1, le=1024, description="changes are split by key hash; one worker each"
    )

    @model_validator(mode="after")
    def _url_fits_kind(self) -> BusConfig:
        if (self.kind == "kafka") != self.url.startswith("kafka://"):
            form = "kafka://host:9092" if self.kind == "kafka" else "redis://host:6379"
            raise ValueError(f"bus kind {self.kind!r} takes a url like {form}")
        return self

    heartbeat: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="seconds between lease renewals; a dead holder on another host is taken "
        "over after 6 of them (on this host at once)",
    )


class HttpConfig(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=8787, ge=0, le=65535)
    token: SecretStr | None = Field(default=None, description="required beyond loopback")
    max_lag_seconds: float = Field(default=60.0, gt=0, description="/readyz lag threshold")


class Config(_Frozen):
    state: StateConfig = Field(default_factory=StateConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    bus: BusConfig | None = None
    sources: dict[str, SourceConfig]
    sinks: dict[str, SinkConfig]
    embedders: dict[str, EmbedderConfig]
    mappings: tuple[MappingConfig, ...] = Field(min_length=1)
    base_dir: Path = Field(Path("."), exclude=True)

    @model_validator(mode="after")
    def _references(self) -> Config:
        # a mapping with several sinks runs as one mapping per sink (MappingConfig.per_sink)
        # and one mapping per embedder chosen (MappingConfig.per_embedder)
        copies = (e for m in self.mappings for c in m.per_sink() for e in c.per_embedder())
        object.__setattr__(self, "mappings", tuple(copies))
        seen: set[str] = set()
        collections: dict[tuple[str, str], str] = {}
        for i, m in enumerate(self.mappings):
            where = f"mappings[{i}] ({m.name!r})"
            if m.name in seen:
                raise ValueError(f"{where}: duplicate mapping name; names must be unique")
            seen.add(m.name)
            other = collections.setdefault((m.sink, m.collection_name), m.name)
            if other != m.name:
                raise ValueError(
                    f"{where}: collection {m.collection_name!r} of sink {m.sink!r} is also "
                    f"written by mapping {other!r}; a collection holds one mapping's points "
                    "(checks and repairs own all of it): give each mapping its own collection"
                )
            _chroma_collection(where, m, self.sinks.get(m.sink))
            _graph_collection(where, m, self.sinks.get(m.sink))
            _edges(where, m, self)
            _vectors(where, m, self.sinks.get(m.sink))
            for name in m.sinks or (m.sink,):
                _keep_both(where, m, name, self.sinks.get(name))
            _sparse(where, m, self.embedders)
            source = self.sources.get(m.source)
            if m.write_back and not isinstance(source, SqliteSourceConfig | PostgresSourceConfig):
                raise ValueError(
                    f"{where}: write_back updates rows of an SQL source (sqlite, postgres); "
                    f"source {m.source!r} is {getattr(source, 'kind', '?')}"
                )
            refs: list[tuple[str, str, Mapping[str, object]]] = [
                ("source", m.source, self.sources),
                ("sink", m.sink, self.sinks),
                *(("embedder", e, self.embedders) for e in m.embedders_used),
            ]
            for field, ref, table in refs:
                if ref not in table:
                    known = ", ".join(sorted(table)) or "none"
                    raise ValueError(
                        f"{where}.{field}: unknown {field} {ref!r} (defined: {known}); "
                        f"add [{field}s.{ref}] or use one of those"
                    )
        return self

    def resolve(self, path: Path) -> Path:
        """A path from the config file, relative to the file's folder."""
        return path if path.is_absolute() else self.base_dir / path

    def state_url(self) -> str:
        prefix = "sqlite:///"
        url = self.state.url
        if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
            return prefix + str(self.resolve(Path(url[len(prefix) :])))
        return url


def _vectors(where: str, m: MappingConfig, sink: SinkConfig | None) -> None:
    if m.vectors and not isinstance(sink, QdrantEdgeSinkConfig | QdrantSinkConfig):
        kind = getattr(sink, "kind", "?")
        raise ValueError(
            f"{where}: named vectors need a Qdrant sink (qdrant-edge or qdrant); sink "
            f"{m.sink!r} ({kind}) stores one vector per point: declare one mapping per vector"
        )


def _keep_both(where: str, m: MappingConfig, name: str, sink: SinkConfig | None) -> None:
    if m.conflicts == "keep_both" and not isinstance(sink, QdrantEdgeSinkConfig | QdrantSinkConfig):
        kind = getattr(sink, "kind", "?")
        raise ValueError(
            f'{where}: conflicts = "keep_both" keeps a foreign vector as a second named vector, '
            f"which needs a Qdrant sink (qdrant-edge or qdrant); sink {name!r} is {kind}: "
            'use conflicts = "merge", "latest_wins" or "source_wins" with it'
        )


def _sparse(where: str, m: MappingConfig, embedders: Mapping[str, EmbedderConfig]) -> None:
    """A sparse embedder makes one vector of several, never the first (search's default)."""
    first = m.vectors[0].embedder if m.vectors else m.embedder
    if isinstance(embedders.get(first), SparseEmbedderConfig):
        what = "the first of its vectors" if m.vectors else "its embedder"
        raise ValueError(
            f"{where}: embedder {first!r} makes sparse vectors and cannot be {what}: declare "
            "[[mappings.vectors]] with a dense vector first and the sparse one after it"
        )


def _chroma_collection(where: str, m: MappingConfig, sink: SinkConfig | None) -> None:
    if not isinstance(sink, ChromaSinkConfig):
        return
    from .sinks.chroma import check_collection_name

    if (why := check_collection_name(m.collection_name)) is not None:
        raise ValueError(
            f"{where}: collection {m.collection_name!r} cannot be a Chroma collection of sink "
            f"{m.sink!r}: {why}; set collection to another name"
        )


def _graph_collection(where: str, m: MappingConfig, sink: SinkConfig | None) -> None:
    if not isinstance(sink, GRAPH_SINKS):
        return
    from .sinks._graph_sink import check_label

    if (why := check_label(m.collection_name)) is not None:
        raise ValueError(
            f"{where}: collection {m.collection_name!r} cannot be a node label of sink "
            f"{m.sink!r}: {why}; set collection to another name"
        )


def edge_target(config: Config, name: str, sink: str) -> MappingConfig | None:
    """The mapping an edge's ``to`` names, as written to ``sink``: the mapping, or its copy
    in that sink (a mapping with several sinks)."""
    for other in config.mappings:
        if other.sink == sink and name in (other.name, other.family):
            return other
    return None


def _edges(where: str, m: MappingConfig, config: Config) -> None:
    if not m.edges:
        return
    if not isinstance(config.sinks.get(m.sink), GRAPH_SINKS):
        if any(o.family == m.family and o.sink != m.sink for o in config.mappings):
            return  # a copy of a several-sink mapping: its graph sink's copy has the edges
        raise ValueError(
            f"{where}.edges: sink {m.sink!r} is not a graph sink; relationships are written "
            'by kind = "falkordb" or "neo4j" sinks only'
        )
    ours = {other.collection_name for other in config.mappings if other.sink == m.sink}
    for edge in m.edges:
        target = edge_target(config, edge.to or "", m.sink)
        if edge.to is not None and target is None:
            known = ", ".join(sorted(o.name for o in config.mappings if o.sink == m.sink))
            raise ValueError(
                f"{where}.edges: edge {edge.type!r}: to = {edge.to!r} is not a mapping "
                f"written to sink {m.sink!r} (those are: {known}); name one, or use label"
            )
        if edge.label is None:
            continue
        from .sinks._graph_sink import check_label

        why = check_label(edge.label) or (
            f"it is a collection of sink {m.sink!r} (use to = <its mapping>)"
            if edge.label in ours
            else None
        )
        if why is not None:
            raise ValueError(f"{where}.edges: edge {edge.type!r}: label {edge.label!r}: {why}")


def load_config(path: Path | str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the config file (``path``, else ``$VECTORSYNC_CONFIG``, else
    ``./vectorsync.toml``), applying ``VECTORSYNC_*`` env overrides."""
    env = os.environ if environ is None else environ
    file = Path(path or env.get(CONFIG_ENV) or "vectorsync.toml")
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"config file {str(file)!r} not found; pass -c PATH or set {CONFIG_ENV}"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from exc
    return parse_config(data, base_dir=file.resolve().parent, environ=env, origin=str(file))


def parse_config(
    data: Mapping[str, Any],
    *,
    base_dir: Path = Path("."),
    environ: Mapping[str, str] | None = None,
    origin: str = "config",
) -> Config:
    merged = _apply_env(dict(data), {} if environ is None else environ)
    try:
        return Config.model_validate({**merged, "base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from None


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if len(path) < 2:
            continue
        node = data
        for part in path[:-1]:
            child = node.get(part)
            node[part] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        node[path[-1]] = _scalar(raw)
    return data


def _scalar(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _describe(exc: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid configuration"]
    errors = exc.errors()
    located = {e["loc"][0] for e in errors if len(e["loc"]) > 1}
    for err in errors:
        if err["type"] == "too_short" and err["loc"][:1] == err["loc"] and err["loc"][0] in located:
            continue  # "no items left" because an item failed: that item's error says why
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field; remove it or check its spelling"
        elif err["type"] == "union_tag_invalid":
            msg = f"{msg}; use one of the kinds listed"
        lines.append(f"  {loc or '(top level)'}: {msg}")
    return "\n".join(lines)
