"""Sync metadata through the CLI: runs, stats, the dead-letter queue, recovery after kill -9,
and 1,000 records with injected faults."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.e2e.test_cli import cli
from tests.helpers import App, wait_for, write_config

FAULTY_TEXT = "{{ title }}\\n{{ body }}{% if published == 0 %}{{ 1 // published }}{% endif %}"


def cli_json(*args: str, cwd: Path) -> Any:
    done = cli(*args, "--json", cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_kill_9_marks_the_run_failed_at_next_start_and_loses_nothing(
    workdir: Path, app: App
) -> None:
    for k in range(1, 201):
        app.insert(k)
    write_config(workdir, batch_size=10)
    proc = subprocess.Popen(
        [sys.executable, "-m", "vectorsync", "run"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = workdir / ".vectorsync" / "state.db"

    def running() -> bool:
        if not state.exists():
            return False
        with sqlite3.connect(state) as db:
            try:
                return (
                    db.execute(
                        "SELECT COUNT(*) FROM sync_runs WHERE status = 'running'"
                    ).fetchone()[0]
                    == 1
                )
            except sqlite3.OperationalError:  # tables not created yet
                return False

    wait_for(running, 60)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    app.insert(500)
    done = cli("run", "--once", cwd=workdir)
    assert done.returncode == 0, done.stderr
    runs = cli_json("runs", cwd=workdir)["runs"]
    assert [r["status"] for r in runs] == ["completed", "failed"]
    assert runs[1]["mode"] == "stream" and "died" in runs[1]["error_message"]
    status = cli_json("status", cwd=workdir)["mappings"][0]
    assert status["records"] == 201 and status["lag_changes"] == 0


def test_1000_records_with_injected_faults_are_synced_or_dead_lettered(
    workdir: Path, app: App
) -> None:
    faults = ["null_text", "oversized", "invalid_utf8", "wrong_type", "template"]
    expected: dict[int, str] = {}
    app.db.execute("BEGIN")
    for k in range(1, 1001):
        app.insert(k, body=f"body {k}")
        if k % 10 == 0:
            fault = faults[(k // 10) % len(faults)]
            expected[k] = fault
            if fault == "null_text":
                app.update(k, title=None, body=None)
            elif fault == "oversized":
                app.update(k, body="x" * 5000)
            elif fault == "invalid_utf8":
                app.db.execute(
                    "UPDATE articles SET body = CAST(X'C328FF' AS TEXT) WHERE id = ?", (k,)
                )
            elif fault == "wrong_type":
                app.update(k, published="not a year")
            else:
                app.update(k, published=0)
    app.db.execute("COMMIT")
    write_config(
        workdir,
        text=FAULTY_TEXT,
        extra_mapping='max_text_length = 2000\nlong_text = "dead_letter"',  # refuse, not cut
        batch_size=128,
    )
    done = cli("run", "--once", cwd=workdir)
    assert done.returncode == 0, done.stderr
    letters = cli_json("dlq", "list", cwd=workdir)["dead_letters"]
    codes = {int(d["key"]): d["details"]["error_code"] for d in letters}
    assert codes == {
        k: {
            "null_text": "empty_text",
            "oversized": "text_too_long",
            "invalid_utf8": "invalid_utf8",
            "wrong_type": "payload_type",
            "template": "render",
        }[f]
        for k, f in expected.items()
    }
    assert all(d["message"] and d["error_type"] in ("validation", "render") for d in letters)
    status = cli_json("status", cwd=workdir)["mappings"][0]
    assert status["records"] == 1000 - len(expected) and status["dead_letters"] == len(expected)
    stats = cli_json("stats", cwd=workdir)
    assert stats["errors_by_type"] == {"validation": 80, "render": 20}
    assert stats["dead_letters_pending"] == 100 and stats["success_rate"] == 1.0


def test_dlq_commands_show_replay_and_discard(workdir: Path, app: App) -> None:
    for k in range(1, 6):
        app.insert(k)
    app.update(2, published=0)
    app.update(4, published=0)
    write_config(workdir, text=FAULTY_TEXT)
    assert cli("run", "--once", cwd=workdir).returncode == 0
    letters = {d["key"]: d for d in cli_json("dlq", "list", cwd=workdir)["dead_letters"]}
    assert set(letters) == {"2", "4"}
    shown = cli("dlq", "show", str(letters["2"]["id"]), cwd=workdir)
    assert shown.returncode == 0 and "ZeroDivisionError" in shown.stdout
    app.update(2, published=2022)  # fix one row
    replay = cli("dlq", "replay", str(letters["2"]["id"]), "--now", cwd=workdir)
    assert replay.returncode == 0, replay.stderr
    assert "1 dead letter enqueued" in replay.stderr and "1 upserted" in replay.stderr
    discard = cli("dlq", "discard", str(letters["4"]["id"]), cwd=workdir)
    assert discard.returncode == 0 and "1 dead letter discarded" in discard.stderr
    assert cli_json("dlq", "list", cwd=workdir)["dead_letters"] == []
    every = cli_json("dlq", "list", "--status", "resolved", cwd=workdir)["dead_letters"]
    assert [d["key"] for d in every] == ["2"]
    table = cli("runs", cwd=workdir)
    assert table.returncode == 0 and "completed" in table.stdout
    missing = cli("dlq", "show", "999", cwd=workdir)
    assert missing.returncode == 1 and "no dead letter with id 999" in missing.stderr
