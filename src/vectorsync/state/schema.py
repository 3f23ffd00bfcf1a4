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

SCHEMA_VERSION = 1

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
    Column("position", BigInteger, nullable=False),
    Column("updated_at", Float, nullable=False),
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
    Column("status", String(20), nullable=False),  # pending | resolved | discarded
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ux_dead_letter_record", "mapping", "key", unique=True),
)

mapping_counters = Table(
    "mapping_counters",
    metadata,
    Column("mapping", String(200), primary_key=True),
    Column("name", String(40), primary_key=True),
    Column("value", BigInteger, nullable=False),
)
