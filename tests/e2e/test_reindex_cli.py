"""Re-index through the CLI: ``vectorsync run`` killed with SIGKILL during a backfill
resumes from its checkpoint; ``reindex --dry-run`` predicts and changes nothing;
``sync.reindex = "manual"`` waits for ``vectorsync reindex``."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import App, sync_once
from tests.integration.test_reindex import bulk, config
from vectorsync.model import content_hash

RECORDS = 8_000  # 80 pages: five runs killed after 1-3 pages each leave most to do
BATCH = 200  # sync.batch_size: a backfill's in-flight budget
KILLS = 5
DEADLINE = 120.0
# `vectorsync` with every text the hash embedder is asked to embed counted in a file
# (appended before the embedding, so a kill mid-call still counts it): the runs' total
# survives their kill -9
COUNTED = """
import os, sys
from vectorsync.embed.hash import HashEmbedder
fd = os.open(os.environ["EMBED_COUNT_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
plain = HashEmbedder.embed
async def embed(self, texts):
    os.write(fd, f"{self.model_id} {len(texts)}\\n".encode())
    return await plain(self, texts)
HashEmbedder.embed = embed
sys.argv = ["vectorsync", *sys.argv[1:]]
from vectorsync._main import main
main()
"""


def vectorsync(workdir: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "vectorsync", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )
    return done


def embedded(counts: Path, model: str) -> int:
    if not counts.exists():
        return 0
    lines = [line.split() for line in counts.read_text().splitlines()]
    return sum(int(n) for m, n in lines if m == model)


def checkpoint(workdir: Path, version: int = 2) -> tuple[int, Any, int, str] | None:
    """(records backfilled, last key, done, state) of a version, read from the state store
    as any monitoring tool would."""
    db = sqlite3.connect(workdir / ".vectorsync" / "state.db", timeout=30)
    try:
        row = db.execute(
            "SELECT backfilled, backfill_after, backfill_done, state FROM index_versions "
            "WHERE mapping = 'articles' AND version = ?",
            (version,),
        ).fetchone()
    except sqlite3.OperationalError:  # the table is made by the first run
        return None
    finally:
        db.close()
    if row is None:
        return None
    return int(row[0]), None if row[1] is None else json.loads(row[1]), int(row[2]), row[3]


@pytest.mark.slow
def test_kill_9_during_a_backfill_resumes_from_its_checkpoint(workdir: Path, app: App) -> None:
    """Each run is killed once it has committed 1 to 3 pages of its own (the state store's
    checkpoint moved), wherever its pipeline then is: the next one goes on after the
    checkpoint, and what the kills threw away is at most a batch each."""
    rng = random.Random(1313)
    bulk(app, RECORDS)
    asyncio.run(sync_once(config(workdir, dimension=384)))
    config(workdir, dimension=256, batch_size=BATCH)
    counts = workdir / "embedded.txt"
    env = {**os.environ, "EMBED_COUNT_FILE": str(counts)}
    seen: list[tuple[int, Any]] = []  # every checkpoint observed, in order, across runs
    wasted: list[int] = []  # per killed run: texts embedded for pages it did not commit
    for kill in range(KILLS):
        start = checkpoint(workdir)
        pages, base = rng.randint(1, 3), 0 if start is None else start[0]
        proc = subprocess.Popen(
            [sys.executable, "-c", COUNTED, "run"],
            cwd=workdir,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + DEADLINE
            advanced: set[int] = set()
            while len(advanced) < pages:  # until this run commits its pages: then kill it
                now = checkpoint(workdir)
                if now is not None and now[0] > base and now[0] not in advanced:
                    advanced.add(now[0])
                    seen.append((now[0], now[1]))
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "no backfill page committed"
                time.sleep(0.005)  # polling the state store, not synchronisation
        finally:
            proc.send_signal(signal.SIGKILL)
            _, stderr = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, stderr
        after = checkpoint(workdir)
        assert after is not None and after[2] == 0 and after[3] == "building", (kill, after)
        seen.append((after[0], after[1]))
        # what this run embedded beyond the pages it committed: at most one batch
        wasted.append(embedded(counts, "hash-v1/256") - after[0] - sum(wasted))
        assert 0 <= wasted[-1] <= BATCH, (kill, wasted)
    done = subprocess.run(
        [sys.executable, "-c", COUNTED, "run", "--once"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    final = checkpoint(workdir)
    assert final is not None and final[2] == 1 and final[3] == "live"
    # the checkpoint never went back, and every page was committed once: no restart from 0
    assert seen == sorted(seen, key=lambda s: s[0]), seen
    assert [k for _, k in seen] == sorted(k for _, k in seen), seen
    assert final[0] == RECORDS
    total = embedded(counts, "hash-v1/256")
    print(f"embedded {total} for {RECORDS} records after {KILLS} kills; wasted {wasted}")
    assert RECORDS <= total <= RECORDS + KILLS * BATCH
    checked = vectorsync(workdir, "check", "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    listed = json.loads(vectorsync(workdir, "indexes", "--json").stdout)["indexes"]
    assert [(v["version"], v["state"], v["dimension"], v["records"]) for v in listed] == [
        (1, "previous", 384, RECORDS),
        (2, "live", 256, RECORDS),
    ]


def state_dump(workdir: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of the state store."""
    db = sqlite3.connect(workdir / ".vectorsync" / "state.db", timeout=30)
    try:
        tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: sorted(db.execute(f'SELECT * FROM "{t}"').fetchall(), key=repr) for t in tables}
    finally:
        db.close()


def sink_dump(workdir: Path) -> dict[str, Any]:
    """Every collection of the qdrant-edge folder (and where the name points) with its
    points, vectors and payloads."""
    from vectorsync.sinks.base import CollectionSpec
    from vectorsync.sinks.qdrant_edge import QdrantEdgeSink

    db = sqlite3.connect(workdir / ".vectorsync" / "state.db", timeout=30)
    made = db.execute("SELECT collection, definition FROM index_versions").fetchall()
    db.close()
    dimensions = {c: json.loads(d)["dimension"] for c, d in made}

    async def dump() -> dict[str, Any]:
        sink = QdrantEdgeSink("vectors", workdir / ".vectorsync" / "qdrant")
        await sink.open()
        try:
            found: dict[str, Any] = {"alias": await sink.alias_target("articles")}
            for name in sorted(await sink.collections()):
                await sink.ensure_collection(
                    CollectionSpec(name=name, dimension=dimensions[name], distance="cosine")
                )
                scrolled = [r async for r in sink.scroll(name, with_vectors=True)]
                found[name] = sorted(
                    ((r.id, r.vector, sorted(r.payload.items())) for r in scrolled), key=repr
                )
            return found
        finally:
            await sink.close()

    return asyncio.run(dump())


def test_dry_run_predicts_the_embeddings_and_changes_nothing(workdir: Path, app: App) -> None:
    """A template change that leaves most texts as they were: the dry run tells the texts
    to embed apart from those the cache has (and repeated texts apart from records)."""
    bulk(app, 3000)
    with app.transaction():
        app.execute("UPDATE articles SET title = 'shared', body = 'one text' WHERE id <= 300")
    asyncio.run(sync_once(config(workdir)))
    config(workdir, text="{{ title }}\\n{{ body }}{% if tags == 'b' %} (b){% endif %}")
    state, sink = state_dump(workdir), sink_dump(workdir)
    dry = vectorsync(workdir, "reindex", "articles", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert state_dump(workdir) == state, "the dry run wrote to the state store"
    assert sink_dump(workdir) == sink, "the dry run wrote to the sink"
    rows = app.rows()
    changed = {k for k, r in rows.items() if r["tags"] == "b"}
    assert plan["version_changes"] is True and plan["records"] == 3000
    assert plan["texts"] == 3000 - 300 + 2  # the shared text once per tag (a, b)
    assert 0 < plan["to_embed"] < plan["texts"] and plan["from_cache"] > 0
    assert plan["to_embed"] == len({(rows[k]["title"], rows[k]["body"]) for k in changed})
    assert plan["estimated_tokens"] > 0 and plan["embed_rate"] > 0
    real = vectorsync(workdir, "reindex", "articles", "--json")
    assert real.returncode == 0, real.stderr
    run = json.loads(real.stdout)["run"]
    db = sqlite3.connect(workdir / ".vectorsync" / "state.db")
    [(embedded,)] = db.execute("SELECT records_embedded FROM sync_runs WHERE id = ?", (run,))
    db.close()
    assert abs(embedded - plan["to_embed"]) <= plan["to_embed"] / 100, (embedded, plan)


def test_manual_reindex_reports_outdated_until_asked(workdir: Path, app: App) -> None:
    bulk(app, 500)
    manual = 'reindex = "manual"'
    asyncio.run(sync_once(config(workdir, sync=manual)))
    config(workdir, dimension=256, sync=manual)
    assert vectorsync(workdir, "run", "--once").returncode == 0
    app.update(1, body="written after the model changed")
    assert vectorsync(workdir, "run", "--once").returncode == 0

    def listed() -> list[tuple[int, str, int]]:
        rows = json.loads(vectorsync(workdir, "indexes", "--json").stdout)["indexes"]
        return [(v["version"], v["state"], v["dimension"]) for v in rows]

    def outdated() -> int:
        status = vectorsync(workdir, "status", "--json")
        assert status.returncode == 0, status.stderr
        [m] = json.loads(status.stdout)["mappings"]
        return int(m["outdated"])

    assert listed() == [(1, "live", 384)]  # nothing built
    assert outdated() == 500
    # the live version keeps serving, and following changes, with its own model
    found = vectorsync(workdir, "search", "articles", "written after the model", "--json")
    assert found.returncode == 0, found.stderr
    top = json.loads(found.stdout)["hits"][0]
    assert top["key"] == 1 and top["text"] == "title 1\nwritten after the model changed"
    points = sink_dump(workdir)["articles__v1"]
    assert len(points) == 500 and {len(v) for _, v, _ in points} == {384}
    [first] = [dict(p) for _, _, p in points if dict(p)["_vs_key"] == 1]
    assert first["_vs_text_hash"] == content_hash("hash-v1/384", top["text"])
    done = vectorsync(workdir, "reindex", "articles")
    assert done.returncode == 0, done.stderr
    assert listed() == [(1, "previous", 384), (2, "live", 256)]
    assert outdated() == 0
    assert {len(v) for _, v, _ in sink_dump(workdir)["articles__v2"]} == {256}
