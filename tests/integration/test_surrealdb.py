"""SurrealDB specifics on the embedded engine: an expired change feed is answered with a
re-snapshot (never a silent gap), the connection is handed over through ``Engine.open``,
and what SurrealDB refuses is named.

SurrealDB 2.3 embedded (SDK 2.0.0) never runs its change-feed garbage collection (a
server does, on its tick): the expiry is played by :class:`Expiring`, which hides feed
entries below a cutoff from ``SHOW CHANGES`` exactly as a server's collection drops them
(a ``SINCE`` below the oldest kept entry silently starts there)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import SurrealApp, check, load, write_config
from vectorsync.engine import Engine, RunResult
from vectorsync.errors import ConfigError
from vectorsync.sources.base import TableSpec
from vectorsync.sources.surrealdb import FEED_TABLE, SurrealDBSource

SPEC = TableSpec(table="articles", key="id")


class Expiring:
    """The application's connection, with the change feed collected below ``cutoff``."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.cutoff = 0  # a versionstamp as SDK 2 reports it (shifted left 16 bits)

    def query_raw(self, sql: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        since = re.sub(r"SINCE (\d+)", lambda m: f"SINCE {max(int(m[1]), self.cutoff >> 16)}", sql)
        return dict(self.db.query_raw(since, params or {}))

    def newest(self, app: SurrealApp) -> int:
        """The newest versionstamp of the feeds (the mapped table's and ours)."""
        found = [
            tx["versionstamp"]
            for table in ("articles", FEED_TABLE)
            for tx in app.query(f"SHOW CHANGES FOR TABLE {table} SINCE 0 LIMIT 1000")[0]
        ]
        return max(found)


@pytest.fixture
def surreal(workdir: Path) -> Any:
    application = SurrealApp(workdir / "kb")
    (workdir / "source.toml").write_text(application.source_toml + '\nretention = "1h"')
    yield application
    application.close()


async def sync(cfg: Path, conn: Expiring) -> tuple[RunResult, int]:
    async with Engine.open(load(cfg), connections={"app": conn}) as engine:
        result = await engine.run(once=True)
        source = engine.sources["app"]
        assert isinstance(source, SurrealDBSource)
        return result, source.expired


async def test_a_feed_expired_during_a_pause_is_answered_with_a_resnapshot(
    workdir: Path, surreal: SurrealApp
) -> None:
    conn = Expiring(surreal.db)
    for k in range(1, 21):
        surreal.insert(k)
    cfg = write_config(workdir)
    assert (await sync(cfg, conn))[1] == 0
    surreal.update(2, body="read from the feed")  # within retention: streamed, no re-snapshot
    result, expired = await sync(cfg, conn)
    assert expired == 0 and result.changes == 1
    await check(cfg, surreal)

    # vectorsync is stopped longer than the retention: these changes are collected ...
    surreal.update(3, body="changed during the pause")
    surreal.delete(5)
    surreal.insert(21)
    conn.cutoff = conn.newest(surreal) + (1 << 16)
    surreal.update(4, body="changed after the cutoff")  # ... this one is still kept
    result, expired = await sync(cfg, conn)
    assert expired == 1
    await check(cfg, surreal)  # sink = source: 3 and 21 re-read, 5 gone

    surreal.update(6, body="streamed again")
    result, expired = await sync(cfg, conn)
    assert expired == 0 and result.changes == 1
    await check(cfg, surreal)


async def test_an_idle_source_outlives_its_retention_without_a_resnapshot(
    surreal: SurrealApp,
) -> None:
    """Beats witness that nothing happened: a feed collected up to
    them lost nothing of ours. Collected past every witness, the gap cannot be ruled out:
    a re-snapshot (conservative)."""
    conn = Expiring(surreal.db)
    src = SurrealDBSource(
        "app", namespace="app", database="kb", beat_interval=3600, connection=conn
    )
    await src.open()
    surreal.insert(1)
    await src.setup([SPEC])
    surreal.update(1, body="v2")
    changes = await src.read_changes(0, 100)
    assert [(c.key, c.op) for c in changes] == [(1, "snapshot"), (1, "update")]
    position = changes[-1].position
    assert await src.head() == position  # its fence is a beat
    assert await src.read_changes(position, 100) == []  # nothing up to the beat
    conn.cutoff = conn.newest(surreal)  # everything but the beat collected
    assert await src.read_changes(position, 100) == [] and src.expired == 0
    conn.cutoff += 1 << 16  # the beat too
    assert await src.read_changes(position, 100) == [] and src.expired == 1
    epoch = await src.epoch()
    changes = await src.read_changes(0, 100)
    assert [(c.key, c.op) for c in changes] == [("", "truncate"), (1, "snapshot")]
    assert await src.epoch() == epoch and src.expired == 1
    await src.close()


async def test_an_embedded_url_without_a_connection_names_the_fix() -> None:
    src = SurrealDBSource("kb", "surrealkv://nowhere", namespace="app", database="kb")
    with pytest.raises(ConfigError, match=r'connections=\{"kb": db\}'):
        await src.open()


async def test_a_connection_on_another_database_is_refused(surreal: SurrealApp) -> None:
    src = SurrealDBSource("kb", namespace="app", database="other", connection=surreal.db)
    with pytest.raises(ConfigError, match="database 'kb'; the config says 'app', 'other'"):
        await src.open()


async def test_keys_other_than_the_record_id_are_refused(surreal: SurrealApp) -> None:
    src = SurrealDBSource("kb", namespace="app", database="kb", connection=surreal.db)
    await src.open()
    with pytest.raises(ConfigError, match='use key = "id"'):
        await src.setup([TableSpec(table="articles", key="slug")])
    await src.close()


async def test_connections_for_unknown_sources_are_refused(
    workdir: Path, surreal: SurrealApp
) -> None:
    cfg = write_config(workdir)
    with pytest.raises(ConfigError, match=r"connections given for 'kb': no source"):
        async with Engine.open(load(cfg), connections={"kb": surreal.db}):
            pass


async def test_credentials_stay_secret(workdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A server's password (a field, and in a URL) is in no error, log or config text —
    against a port nothing listens on (no SurrealDB server installs here)."""
    import socket

    from vectorsync.errors import SourceError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret, in_url = "surr3al-s3cret-pw", "url-s3cret-pw"
    (workdir / "source.toml").write_text(
        f'kind = "surrealdb"\nurl = "ws://root:{in_url}@127.0.0.1:{port}"\n'
        f'namespace = "app"\ndatabase = "kb"\nusername = "root"\npassword = "{secret}"'
    )
    config = load(write_config(workdir))
    with pytest.raises(SourceError) as failed:
        async with Engine.open(config):
            pass
    from vectorsync.redact import redact

    # config text leaves the process through redact(), as for every source kind
    texts = [str(failed.value), repr(failed.value), redact(repr(config)), caplog.text]
    assert f"127.0.0.1:{port}" in str(failed.value)
    assert not [t for t in texts if secret in t or in_url in t]


RELATED = """
[[mappings.related]]
name = "doc"
table = "document"
on = { id = "doc" }
fields = { doc_title = "title" }

[[mappings.related]]
name = "ents"
pattern = "<-mentions<-entity"
fields = { entities = "name" }
many = true
"""


async def payloads(cfg: Path, surreal: SurrealApp) -> dict[Any, tuple[Any, Any]]:
    """Sync once; each article's (doc_title, entities) as the sink holds them, after a full
    check proved the sink equal to the source."""
    async with Engine.open(load(cfg), connections={"app": surreal.db}) as engine:
        await engine.run(once=True)
        report = await engine.check("articles", mode="full")
        assert report.consistent, report.counts
        sink = engine.sinks["vectors"]
        return {
            r.payload["_vs_key"]: (r.payload["doc_title"], r.payload["entities"])
            async for r in sink.scroll("articles")
        }


async def test_related_fields_follow_record_links_and_graph_edges(
    workdir: Path, surreal: SurrealApp
) -> None:
    from surrealdb import RecordID

    q = surreal.query
    q("CREATE document:1 SET title = 'one'; CREATE document:2 SET title = 'two'")
    q("CREATE entity:1 SET name = 'Ada'; CREATE entity:2 SET name = 'Bob'")
    q("CREATE entity:3 SET name = 'Cy'")
    for k in range(1, 5):
        surreal.insert(k, doc=RecordID("document", 1 if k <= 2 else 2))
    q("RELATE entity:1->mentions->articles:1; RELATE entity:2->mentions->articles:1")
    q("RELATE entity:2->mentions->articles:2")
    cfg = write_config(
        workdir,
        text="{{ title }} {{ doc_title }} {{ entities | join(' ') }}",
        payload=["author", "doc_title", "entities"],
        extra_mapping=RELATED,
    )
    assert await payloads(cfg, surreal) == {
        1: ("one", ["Ada", "Bob"]),
        2: ("one", ["Bob"]),
        3: ("two", []),
        4: ("two", []),
    }
    q("UPDATE entity:2 SET name = 'Bea'")  # a related record changes: both fan out
    q("RELATE entity:3->mentions->articles:3")  # an edge appears
    q("DELETE mentions WHERE in = entity:1")  # an edge goes (its feed entry: only its id)
    q("UPDATE document:2 SET title = 'TWO'")  # a linked record changes
    assert await payloads(cfg, surreal) == {
        1: ("one", ["Bea"]),
        2: ("one", ["Bea"]),
        3: ("TWO", ["Cy"]),
        4: ("TWO", []),
    }
    q("DELETE entity:2")  # a related record goes, and its edges with it
    assert await payloads(cfg, surreal) == {
        1: ("one", []),
        2: ("one", []),
        3: ("TWO", ["Cy"]),
        4: ("TWO", []),
    }


async def test_a_graph_path_that_is_not_one_hop_names_the_form(
    workdir: Path, surreal: SurrealApp
) -> None:
    surreal.insert(1)
    cfg = write_config(
        workdir,
        extra_mapping=RELATED.replace("<-mentions<-entity", "<-mentions->entity"),
    )
    with pytest.raises(ConfigError, match="graph path from the mapped record"):
        async with Engine.open(load(cfg), connections={"app": surreal.db}) as engine:
            await engine.prepare()
