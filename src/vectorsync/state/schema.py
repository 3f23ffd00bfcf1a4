"""Metadata tables, one definition for SQLite and PostgreSQL (SQLAlchemy Core)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

SCHEMA_VERSION = 3

metadata = MetaData()

meta = Table(
    "vs_meta",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("value", Text, nullable=False),
)

positions = Table(
    "positions",
    metadata,
    Column("source", String(200), primary_key=True),
    Column("stream", String(200), primary_key=True),  # "" for the whole source, else a table
    Column("marker_type", String(20), primary_key=True),  # stream | batch
    Column("position", BigInteger, nullable=False),  # stream: source position
    Column("position_data", Text),  # batch: ISO timestamp of the last batch; JSON otherwise
    Column("run_id", Integer),
    Column("updated_at", Float, nullable=False),
)

sync_runs = Table(
    "sync_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("mode", String(20), nullable=False),  # stream | once | backfill | repair | replay
    Column("status", String(20), nullable=False),  # running | completed | failed | cancelled
    Column("started_at", Float, nullable=False),
    Column("completed_at", Float),
    Column("heartbeat_at", Float, nullable=False),
    Column("duration_ms", BigInteger),
    Column("records_processed", BigInteger, nullable=False, default=0),
    Column("records_inserted", BigInteger, nullable=False, default=0),
    Column("records_updated", BigInteger, nullable=False, default=0),
    Column("records_payload_only", BigInteger, nullable=False, default=0),
    Column("records_deleted", BigInteger, nullable=False, default=0),
    Column("records_embedded", BigInteger, nullable=False, default=0),
    Column("records_skipped", BigInteger, nullable=False, default=0),
    Column("records_failed", BigInteger, nullable=False, default=0),
    Column("bytes_processed", BigInteger, nullable=False, default=0),
    Column("tokens", BigInteger, nullable=False, default=0),  # billed by API embedders
    Column("cost", Float),  # of those tokens at the embedders' prices (None: no price)
    Column("config_hash", String(32), nullable=False),
    Column("instance_id", String(100), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("source_info", Text, nullable=False),  # JSON, never credentials
    Column("destination_info", Text, nullable=False),  # JSON, never credentials
    Column("error_message", Text),
    Column("error_details", Text),  # JSON
    Index("ix_sync_runs_started", "started_at"),
)

error_log = Table(
    "error_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer),
    Column("mapping", String(200)),
    Column("source", String(200)),
    Column("key", String(1000)),
    Column("error_type", String(20), nullable=False),  # connection|timeout|validation|render|...
    Column("error_code", String(40)),  # structured: SQLSTATE, HTTP status, SQLite code, kind
    Column("message", Text, nullable=False),
    Column("details", Text, nullable=False),  # JSON
    Column("stack_trace", Text),
    Column("record_data", Text),  # JSON
    Column("retry_count", Integer, nullable=False),
    Column("max_retries", Integer),
    Column("status", String(20), nullable=False),  # open | resolved | ignored
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ix_error_log_created", "created_at"),
)

record_state = Table(
    "record_state",
    metadata,
    Column("mapping", String(200), primary_key=True),
    Column("key", String(1000), primary_key=True),
    Column("point_id", String(36), nullable=False),
    Column("text_hash", String(32), nullable=False),
    Column("payload_hash", String(32), nullable=False),
    Column("source_version", BigInteger, nullable=False),
    Column("schema_version", String(32), nullable=False),
    Column("synced_at", Float, nullable=False),
    Column("payload", Text, nullable=False),  # JSON of the point payload as last written
    Column("bucket", Integer, nullable=False),  # model.key_bucket(key)
    Column("digest_hi", Integer, nullable=False),  # row_digest >> 31
    Column("digest_lo", Integer, nullable=False),  # row_digest & (2**31 - 1)
    Column("chunks", Text, nullable=True),  # JSON of a chunked record's ChunkRefs
    Column("points", Integer, nullable=False, server_default="1"),  # points it was written as
    # covering: per-bucket digest sums are an index-only scan (check --mode prove)
    Index("ix_record_state_bucket", "mapping", "bucket", "digest_hi", "digest_lo"),
)

# which related records (a SQL join, a graph pattern) each record was last built from:
# a change to one of them re-syncs exactly these records, even after it is deleted
record_deps = Table(
    "record_deps",
    metadata,
    Column("mapping", String(200), primary_key=True),
    Column("relation", String(200), primary_key=True),
    Column("related_key", String(1000), primary_key=True),
    Column("key", String(1000), primary_key=True),
    Column("native_key", Text, nullable=False),  # JSON: the key as the source types it
    Index("ix_record_deps_key", "mapping", "key"),
)

# a batch's sink writes, journaled before they are sent and dropped by its state commit:
# after a crash in between, the record state of these keys cannot be trusted (the sink may
# hold a write the state store never heard of), so it is forgotten and the replay rewrites
inflight = Table(
    "inflight",
    metadata,
    Column("source", String(200), primary_key=True),
    Column("position", BigInteger, primary_key=True),
    Column("records", Text, nullable=False),  # JSON: [[mapping, key], ...]
    Column("created_at", Float, nullable=False),
)

# records of a mapping with several sinks that one sink has not been written (it was down):
# caught up from the source when the sink is back, while the other sinks go on streaming
sink_backlog = Table(
    "sink_backlog",
    metadata,
    Column("mapping", String(200), primary_key=True),  # the per-sink mapping (its state name)
    Column("key", String(1000), primary_key=True),
    Column("added_at", Float, nullable=False),
)

embedding_cache = Table(
    "embedding_cache",
    metadata,
    Column("model", String(200), primary_key=True),
    Column("text_hash", String(32), primary_key=True),
    Column("vector", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
)

schema_registry = Table(
    "schema_registry",
    metadata,
    Column("mapping", String(200), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("hash", String(32), nullable=False),
    Column("definition", Text, nullable=False),
    Column("evolution", String(40), nullable=False),
    Column("previous_version", Integer),
    Column("created_at", Float, nullable=False),
)

dead_letter = Table(
    "dead_letter",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("mapping", String(200), nullable=False),
    Column("key", String(1000), nullable=False),
    Column("operation", String(20), nullable=False),
    Column("error_type", String(40), nullable=False),
    Column("message", Text, nullable=False),
    Column("details", Text, nullable=False),  # JSON: the row (or its keys) and the position
    Column("position", BigInteger, nullable=False),
    Column("error_count", Integer, nullable=False),
    Column("status", String(20), nullable=False),  # pending | processing | resolved | discarded
    Column("run_id", Integer),
    Column("error_log_id", Integer),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ux_dead_letter_record", "mapping", "key", unique=True),
)

checks = Table(
    "checks",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("mapping", String(200), nullable=False),
    Column("mode", String(20), nullable=False),  # full | sample | quick
    Column("started_at", Float, nullable=False),
    Column("duration_ms", BigInteger, nullable=False),
    Column("consistent", Integer, nullable=False),
    Column("source_records", BigInteger, nullable=False),
    Column("sink_points", BigInteger, nullable=False),
    Column("counts", Text, nullable=False),  # JSON: category -> count
    Column("report", Text, nullable=False),  # JSON: roots, buckets, estimate, sample of keys
    Column("repair_of", Integer),  # the check this one verified a repair of
    Index("ix_checks_started", "started_at"),
)

mapping_counters = Table(
    "mapping_counters",
    metadata,
    Column("mapping", String(200), primary_key=True),
    Column("name", String(40), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

# who may apply a source's changes: one holder at a time, renewed by its heartbeat; the
# token grows at every takeover and fences the holder's batch commits (see state/leases.py)
leases = Table(
    "leases",
    metadata,
    Column("name", String(200), primary_key=True),  # e.g. "source:app"
    Column("holder", String(100), nullable=False),  # an engine's instance id
    Column("token", BigInteger, nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("process", String(100), nullable=False),  # pid plus start time: survives pid reuse
    Column("run_id", Integer),
    Column("acquired_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
)

# a mapping's index versions: what its vectors are made of (model, dimension, distance,
# template: the digest), the physical collection holding them, and where each stands
index_versions = Table(
    "index_versions",
    metadata,
    Column("mapping", String(200), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("digest", String(32), nullable=False),
    Column("collection", String(255), nullable=False),  # the physical collection
    Column("state", String(20), nullable=False),  # building | live | previous | dropped
    Column("definition", Text, nullable=False),  # JSON: model, dimension, distance, text, embedder
    Column("created_at", Float, nullable=False),
    Column("live_at", Float),
    Column("retired_at", Float),  # when it stopped being live
    Column("dropped_at", Float),
    Column("backfill_after", Text),  # JSON: the last key a backfill committed (a checkpoint)
    Column("backfill_done", Integer, nullable=False, default=0),
    Column("backfilled", BigInteger, nullable=False, default=0),  # records the backfill wrote
)

# conflicts: a point's payload edited in the sink by someone else, and how it was resolved
conflicts = Table(
    "conflicts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("mapping", String(200), nullable=False),
    Column("key", String(1000), nullable=False),
    Column("policy", String(20), nullable=False),
    Column("resolution", String(20), nullable=False),  # source_written | sink_kept | merged
    Column("detected", String(10), nullable=False),  # sync | check
    Column("fields", Text, nullable=False),  # JSON: field → base, source, sink, result
    Column("status", String(20), nullable=False),  # resolved | open (a check's, until synced)
    Column("created_at", Float, nullable=False),
    Column("resolved_at", Float),
    Index("ix_conflicts_mapping_key", "mapping", "key"),
)

# sink values a conflict policy keeps over the source's, per record (conflicts.Kept)
kept_fields = Table(
    "kept_fields",
    metadata,
    Column("mapping", String(200), primary_key=True),
    Column("key", String(1000), primary_key=True),
    Column("fields", Text, nullable=False),  # JSON: field → [kept value, source value then]
)

# the write API's write-ahead journal (see writer.py): one row per write, journaled with the
# row's before-image before the source is written, removed once the write is through
write_journal = Table(
    "write_journal",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("source", String(200), nullable=False),
    Column("txn", String(40), nullable=False),  # the writes committed together at the source
    Column("table_name", String(200), nullable=False),
    Column("key", Text, nullable=False),  # JSON
    Column("op", String(10), nullable=False),  # upsert | delete
    Column("row", Text),  # JSON: the row written (upsert)
    Column("before", Text),  # JSON: the row before the write; NULL when there was none
    Column("holder", String(100), nullable=False),  # the writing engine's instance id
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_write_journal_source", "source"),
)
