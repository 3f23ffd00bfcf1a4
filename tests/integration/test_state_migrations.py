"""State-store schema migrations on the real databases (SQLite, PostgreSQL): a store made
by an earlier vectorsync is upgraded in place and its record state stays readable."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.pgserver import PgServer
from vectorsync.model import RecordState
from vectorsync.state.schema import SCHEMA_VERSION
from vectorsync.state.store import BatchCommit, StateStore


@pytest.fixture(params=["sqlite", "postgres"])
def state_url(request: pytest.FixtureRequest, workdir: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{workdir / 'state.db'}"
        return
    server: PgServer = request.getfixturevalue("pg")
    url = server.create_database("vs_migrate")
    try:
        yield url
    finally:
        with server.admin() as conn:
            conn.execute('DROP DATABASE IF EXISTS "vs_migrate" WITH (FORCE)')


def _sqlalchemy(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


async def test_a_version_1_store_is_upgraded_and_keeps_its_record_state(state_url: str) -> None:
    state = StateStore(state_url)
    await state.open()
    record = RecordState(
        mapping="articles",
        key="7",
        point_id="00000000-0000-5000-8000-000000000007",
        text_hash="a" * 32,
        payload_hash="b" * 32,
        source_version=3,
        schema_version="s",
        synced_at=1.0,
        payload={"author": "ann"},
    )
    await state.commit(BatchCommit(source="app", position=3, upserts=[record]))
    await state.close()
    # make the store as version 1 left it: no chunk or billing columns, schema_version 1
    db = create_engine(_sqlalchemy(state_url))
    with db.begin() as conn:
        conn.execute(text("ALTER TABLE record_state DROP COLUMN chunks"))
        conn.execute(text("ALTER TABLE record_state DROP COLUMN points"))
        conn.execute(text("ALTER TABLE sync_runs DROP COLUMN tokens"))
        conn.execute(text("ALTER TABLE sync_runs DROP COLUMN cost"))
        conn.execute(text("UPDATE vs_meta SET value = '1' WHERE name = 'schema_version'"))
    state = StateStore(state_url)
    await state.open()  # migrates
    try:
        [found] = (await state.record_states("articles", ["7"])).values()
        assert found == record and found.chunks is None and found.point_ids == [record.point_id]
        _, records, points = await state.bucket_sums("articles")
        assert records == points == 1
        assert await state.runs() == []  # the runs table reads with its new columns
    finally:
        await state.close()
    with db.connect() as conn:
        version = conn.execute(
            text("SELECT value FROM vs_meta WHERE name = 'schema_version'")
        ).scalar()
    db.dispose()
    assert version == str(SCHEMA_VERSION) == "3"
