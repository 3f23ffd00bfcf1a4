"""The CLI refusing what cannot work, before it writes anything: bad configs and keys exit 2
naming the field and the fix and leave no trace; a repair or replay with the capture
removed changes nothing; one runner per source whatever the sink."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_cli import cli as run_cli
from tests.helpers import App, read_sink, wait_for, write_config
from vectorsync.sinks.qdrant_edge import QdrantEdgeSink

# a model name must never send the old code (or a regression) to the network
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=cwd, env=_OFFLINE)


def said(done: subprocess.CompletedProcess[str]) -> str:
    """stderr with the console's line wrapping undone."""
    return " ".join(done.stderr.split())


def triggers(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(
            conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'trigger'").fetchone()[0]
        )
    finally:
        conn.close()


def assert_refused(done: subprocess.CompletedProcess[str], workdir: Path, *expected: str) -> None:
    """Exit 2 naming ``expected``, no traceback, and nothing created."""
    assert done.returncode == 2, done.stderr
    for text in expected:
        assert text in said(done), done.stderr
    assert "Traceback" not in done.stderr
    assert not (workdir / ".vectorsync").exists(), "created the state/sink folder"
    assert triggers(workdir / "app.db") == 0, "installed capture"


# -- 13: bad config that used to write before it failed -------------------------------------
def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def _quoted_payload(workdir: Path, app: App, path: Path) -> None:
    app.execute('ALTER TABLE articles ADD COLUMN "it\'s" TEXT')
    _edit(path, '"published"]', '"published", "it\'s"]')


def _sink_path_is_a_file(workdir: Path, app: App, path: Path) -> None:
    (workdir / "vectors.bin").write_text("not a folder")
    _edit(path, 'path = ".vectorsync/qdrant"', 'path = "vectors.bin"')


BAD_CONFIGS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "collection escapes the sink folder": (
        lambda w, a, p: _edit(p, 'sink = "vectors"', 'sink = "vectors"\ncollection = "../../x"'),
        ("mappings[0]", "collection '../../x'", "no path separators"),
    ),
    "payload column named with a quote": (
        _quoted_payload,
        ("payload field", "cannot be a vector-store payload key", "rename the column"),
    ),
    "sink path is a file": (
        _sink_path_is_a_file,
        ("sinks.vectors.path", "is a file, not a folder; point it at a folder"),
    ),
    "missing sentence-transformers model folder": (
        lambda w, a, p: _edit(
            p, 'kind = "hash"', 'kind = "sentence-transformers"\nmodel = "no/such/folder"'
        ),
        ("embedders.default.model", "does not exist", "give a local sentence-transformers"),
    ),
    "attribute of a TEXT column": (
        lambda w, a, p: _edit(p, "{{ body }}", "{{ body.nosuch }}"),
        ("body.nosuch", "TEXT column", "write {{ body }}"),
    ),
    "unknown state URL scheme": (
        lambda w, a, p: _edit(p, "sqlite:///.vectorsync/state.db", "mysql://x"),
        ("state.url", "'mysql' is not a supported state store", "use sqlite:///"),
    ),
    "malformed state URL": (
        lambda w, a, p: _edit(p, "sqlite:///.vectorsync/state.db", "not a url"),
        ("state.url 'not a url' is not a database URL", "use sqlite:///"),
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_exits_2_naming_the_fix_and_creates_nothing(
    workdir: Path, app: App, case: str
) -> None:
    app.insert(1)
    path = write_config(workdir)
    edit, expected = BAD_CONFIGS[case]
    edit(workdir, app, path)
    done = cli("run", "--once", cwd=workdir)
    assert_refused(done, workdir, *expected)
    assert not (workdir.parent.parent / "x").exists() and not (workdir / "x").exists()
    if case == "sink path is a file":
        assert (workdir / "vectors.bin").read_text() == "not a folder"


# -- 5: two mappings, one collection ----------------------------------------------------------
def test_two_mappings_sharing_a_collection_are_refused_naming_both(workdir: Path, app: App) -> None:
    app.insert(1)
    second = "\n".join(
        [
            "[[mappings]]",
            'name = "titles"',
            'source = "app"',
            'table = "articles"',
            'key = "id"',
            'text = "{{ title }}"',
            'sink = "vectors"',
            'collection = "articles"',  # the first mapping's collection (its name)
        ]
    )
    write_config(workdir, extra_mapping=second)
    done = cli("run", "--once", cwd=workdir)
    assert_refused(done, workdir, "('titles')", "also written by mapping 'articles'")
    assert "give each mapping its own collection" in said(done)


# -- 6: keys that cannot identify one row ---------------------------------------------------
def _app_db(workdir: Path, ddl: str, rows: list[tuple[Any, ...]]) -> None:
    db = sqlite3.connect(workdir / "app.db")
    db.execute(ddl)
    db.executemany("INSERT INTO articles VALUES (?, 't', 'b', 'ann', 'a', 2020)", rows)
    db.commit()
    db.close()


def test_a_non_unique_key_is_refused_at_validation(workdir: Path) -> None:
    _app_db(
        workdir,
        "CREATE TABLE articles (id INTEGER, title TEXT, body TEXT, author TEXT, tags TEXT, "
        "published INTEGER)",
        [(1,), (1,), (2,)],  # two rows share key 1
    )
    write_config(workdir)
    done = cli("run", "--once", cwd=workdir)
    assert_refused(
        done,
        workdir,
        "key 'id' of table 'articles' is neither the primary key nor covered by a unique index",
        "CREATE UNIQUE INDEX ON articles (id)",
    )


def test_an_untyped_key_is_refused_so_42_and_text_42_cannot_collide(workdir: Path) -> None:
    _app_db(
        workdir,
        "CREATE TABLE articles (id PRIMARY KEY, title TEXT, body TEXT, author TEXT, tags TEXT, "
        "published INTEGER)",
        [(42,), ("42",)],  # two rows to SQLite, one point id to a vector store
    )
    write_config(workdir)
    done = cli("run", "--once", cwd=workdir)
    assert_refused(done, workdir, "key 'id' of table 'articles'", "declare it INTEGER or TEXT")


# -- 4: repair and replay while the capture is removed ----------------------------------------
def _state_dump(workdir: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table of the state store but ``checks`` (a check records its report)."""
    db = sqlite3.connect(workdir / ".vectorsync" / "state.db")
    try:
        names = [
            r[0]
            for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if r[0] != "checks"
        ]
        return {n: sorted(db.execute(f'SELECT * FROM "{n}"').fetchall(), key=repr) for n in names}
    finally:
        db.close()


def _sink_dump(workdir: Path) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        sink = QdrantEdgeSink("look", workdir / ".vectorsync" / "qdrant")
        await sink.open()
        try:
            points = await read_sink(sink, "articles")
        finally:
            await sink.close()
        return {pid: (r.payload, r.vector) for pid, r in points.items()}

    return asyncio.run(read())


def test_repair_and_replay_after_teardown_change_nothing_and_say_run_setup(
    workdir: Path, app: App
) -> None:
    for k in range(1, 11):
        app.insert(k)
    app.insert(11, title=None, body=None)  # a dead letter to replay
    write_config(workdir)
    assert cli("run", "--once", cwd=workdir).returncode == 0
    done = cli("teardown", cwd=workdir)
    assert done.returncode == 0, done.stderr
    # not captured: drift of every kind a repair acts on (missing, orphaned, stale)
    app.insert(12)
    app.delete(3)
    app.update(4, body="edited while nothing captures")
    state, points = _state_dump(workdir), _sink_dump(workdir)
    assert len(points) == 10 and state["dead_letter"]
    for args in (("check", "--repair"), ("dlq", "replay")):
        done = cli(*args, cwd=workdir)
        assert done.returncode == 2, (args, done.stderr)
        assert "has no change capture installed" in said(done), done.stderr
        assert "run `vectorsync setup` first" in said(done), done.stderr
        assert _state_dump(workdir) == state, f"{args} changed the state store"
        assert _sink_dump(workdir) == points, f"{args} changed the sink"
    assert triggers(workdir / "app.db") == 0


# -- 8: one runner per source, whatever the sink ----------------------------------------------
def _position(workdir: Path) -> int:
    try:
        db = sqlite3.connect(workdir / ".vectorsync" / "state.db")
        try:
            row = db.execute(
                "SELECT position FROM positions WHERE source = 'app' AND stream = '' "
                "AND marker_type = 'stream'"
            ).fetchone()
        finally:
            db.close()
    except sqlite3.Error:  # not created yet
        return 0
    return 0 if row is None else int(row[0])


def test_one_runner_per_source_with_an_in_memory_qdrant_sink(workdir: Path, app: App) -> None:
    for k in range(1, 4):
        app.insert(k)
    write_config(workdir, sink='kind = "qdrant"\npath = ":memory:"')
    log = workdir / "first.log"
    with log.open("w") as stderr:
        first = subprocess.Popen(
            [sys.executable, "-m", "vectorsync", "run"], cwd=workdir, stderr=stderr
        )
    try:
        wait_for(lambda: _position(workdir) >= 3 or first.poll() is not None, 60)
        assert first.poll() is None, log.read_text()
        second = cli("run", "--once", cwd=workdir)
        assert second.returncode != 0, second.stderr
        assert f"pid {first.pid}" in said(second), second.stderr
        assert "one runner per source" in said(second), second.stderr
        assert first.poll() is None, "the first runner stopped streaming"
    finally:
        first.kill()  # SIGKILL: no release of its lease
        first.wait(timeout=30)
    db = sqlite3.connect(workdir / ".vectorsync" / "state.db")
    [(pid, expires_at)] = db.execute("SELECT pid, expires_at FROM leases").fetchall()
    db.close()
    assert pid == first.pid and expires_at > time.time()  # not expired: taken over at once
    app.insert(4)
    third = cli("run", "--once", cwd=workdir)
    assert third.returncode == 0, third.stderr
    assert "1 change in" in said(third) and "1 upserted" in said(third), third.stderr
    assert _position(workdir) == 4
