"""The CLI as users' scripts drive it: a subprocess, exit codes, output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import App, wait_for, write_config


def cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vectorsync", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_run_once_then_status_json(workdir: Path, app: App) -> None:
    for k in range(1, 31):
        app.insert(k)
    write_config(workdir)
    done = cli("run", "--once", cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert "30 changes" in done.stderr and "30 embedded" in done.stderr
    app.insert(31)
    status = cli("status", "--json", cwd=workdir)
    assert status.returncode == 0, status.stderr
    [m] = json.loads(status.stdout)["mappings"]
    assert m["mapping"] == "articles" and m["records"] == 30 and m["position"] == 30
    assert m["lag_changes"] == 1 and m["lag_seconds"] is not None
    assert m["counters"]["embedded"] == 30


def test_config_env_var_and_env_overrides(workdir: Path, app: App) -> None:
    app.insert(1)
    path = write_config(workdir)
    moved = workdir / "conf" / "vs.toml"
    moved.parent.mkdir()
    moved.write_text(path.read_text().replace('path = "app.db"', 'path = "missing.db"'))
    path.unlink()
    env = {
        "VECTORSYNC_CONFIG": str(moved),
        "VECTORSYNC_SOURCES__APP__PATH": str(workdir / "app.db"),
    }
    done = cli("run", "--once", cwd=workdir, env=env)
    assert done.returncode == 0, done.stderr
    assert (workdir / "conf" / ".vectorsync" / "state.db").exists()  # relative to the file


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (('source = "app"', 'source = "ap"'), "unknown source 'ap' (defined: app)"),
        (
            ('"published"]', '"publishd"]'),
            "payload field 'publishd' not in source table 'articles' (columns: id, title, body",
        ),
        (('table = "articles"', 'table = "article"'), "table 'article' not found in"),
        (('kind = "hash"', 'kind = "openai"'), "embedders.default"),
        (('key = "id"', 'key = "uuid"'), "key 'uuid' not in source table 'articles'"),
        (("{{ title }}", "{{ titel }}"), "text template uses 'titel'"),
        (
            ('name = "articles"', 'name = "articles"\nbatchsize = 3'),
            "mappings[0].batchsize: unknown field",
        ),
    ],
)
def test_bad_config_exits_2_naming_the_field(
    workdir: Path, app: App, edit: tuple[str, str], expected: str
) -> None:
    app.insert(1)
    path = write_config(workdir)
    path.write_text(path.read_text().replace(*edit))
    done = cli("run", "--once", cwd=workdir)
    assert done.returncode == 2, done.stderr
    assert expected in " ".join(done.stderr.split()), done.stderr
    assert not (workdir / ".vectorsync" / "qdrant").exists(), "wrote before validating"
    triggers = app.db.execute("SELECT COUNT(*) FROM sqlite_master WHERE type='trigger'").fetchone()
    assert triggers == (0,)


def test_missing_config_file_exits_2(workdir: Path) -> None:
    done = cli("status", cwd=workdir)
    assert done.returncode == 2
    assert "vectorsync.toml" in done.stderr and "-c PATH" in done.stderr


def test_second_writer_on_the_same_edge_folder_gets_a_clear_error(workdir: Path, app: App) -> None:
    app.insert(1)
    write_config(workdir)
    first = subprocess.Popen(
        [sys.executable, "-m", "vectorsync", "run"],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lock = workdir / ".vectorsync" / "qdrant" / ".vectorsync.lock"
        wait_for(lambda: lock.exists() and lock.read_text().strip() != "", 30)
        second = cli("run", "--once", cwd=workdir)
        assert second.returncode == 1
        assert "in use by another process" in second.stderr
    finally:
        first.terminate()
        _, stderr = first.communicate(timeout=30)
    assert first.returncode == 0, stderr


def test_json_logs_carry_action_mapping_and_counts(workdir: Path, app: App) -> None:
    for k in range(1, 11):
        app.insert(k)
    app.update(3, title=None, body=None)
    write_config(workdir)
    done = cli("run", "--once", "-v", "--log-format", "json", cwd=workdir)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    batch = [line for line in lines if line.get("action") == "batch_commit"]
    assert batch and batch[0]["changes"] == 10 and batch[0]["upserted"] == 9
    assert 0 < batch[0]["latency_max_s"] < 3600  # from the rows' commit, seconds ago
    letter = [line for line in lines if line.get("action") == "dead_letter"]
    assert letter[0]["mapping"] == "articles" and letter[0]["key"] == "3"
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in lines)
    bad = cli("run", "--once", "--log-format", "xml", cwd=workdir)
    assert bad.returncode == 2 and "use text or json" in bad.stderr


def _demo(workdir: Path, flag: str) -> str:
    """``vectorsync demo <flag>`` on the hash embedder, its output (it must succeed)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vectorsync",
            "demo",
            flag,
            "--embedder",
            "hash",
            "--records",
            "400",
            "--dir",
            str(workdir / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_graph_demo_runs_and_stops_its_falkordb(workdir: Path) -> None:
    import re
    import socket

    out = _demo(workdir, "--graph")
    assert "only the records built from what changed" in out
    [chunks] = re.findall(r"chunks\s+│\s+0\s+│\s+(\d+)\s+│", out)  # none embedded
    assert int(chunks) >= 2  # the retitled module's chunks and the edges' chunks
    [port] = re.findall(r"FalkorDB at redis://127\.0\.0\.1:(\d+)", out)
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", int(port)), 1):
        pass  # the demo's server is gone


def test_surrealdb_demo_writes_through_the_api_and_proves_the_sync(workdir: Path) -> None:
    import re

    out = _demo(workdir, "--surrealdb")
    searched = out[out.index("3. A strong write") : out.index("4. Through")]
    assert "notes.parse_json" in searched  # found right after the strong write returned
    [row] = re.findall(r"chunks\s+│\s+(\d+)\s+│\s+(\d+)\s+│\s+(\d+)\s+│", out)
    embedded, payload_only, deleted = map(int, row)
    assert (embedded, deleted) == (1, 1)  # the note; the deleted chunk
    assert payload_only >= 2  # the retitled document's chunks, the note's new edge
    assert "chunks in sync" in out and "documents in sync" in out
