"""`vectorsync check` as a cron job runs it: exit 0 when consistent, 1 on drift."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.test_cli import cli
from tests.helpers import App, write_config


def test_check_exit_codes_json_and_repair(workdir: Path, app: App) -> None:
    for k in range(1, 51):
        app.insert(k)
    write_config(workdir)
    assert cli("run", "--once", cwd=workdir).returncode == 0
    clean = cli("check", "--json", cwd=workdir)
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout)["consistent"] is True
    app.db.execute("DROP TRIGGER _vectorsync_articles_del")  # a delete that capture misses
    app.delete(7)
    drift = cli("check", cwd=workdir)
    assert drift.returncode == 1 and "NO" in drift.stdout
    quick = cli("check", "--mode", "quick", "--json", cwd=workdir)
    assert quick.returncode == 1
    [entry] = json.loads(quick.stdout)["checks"]
    assert entry["before"]["counts"]["orphaned"] == 1
    repaired = cli("check", "--repair", "--json", cwd=workdir)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    [entry] = json.loads(repaired.stdout)["checks"]
    assert entry["before"]["counts"]["orphaned"] == 1 and entry["after"]["consistent"]
    sample = cli(
        "check", "--mode", "sample", "--sample-size", "20", "--seed", "3", "--json", cwd=workdir
    )
    assert sample.returncode == 0
    estimate = json.loads(sample.stdout)["checks"][0]["before"]["estimate"]
    assert estimate["sampled"] == 20 and estimate["rate"] == 0.0 and estimate["high"] > 0
    bad_mode = cli("check", "--mode", "fast", cwd=workdir)
    assert bad_mode.returncode == 2 and "use full, sample, quick or prove" in bad_mode.stderr
