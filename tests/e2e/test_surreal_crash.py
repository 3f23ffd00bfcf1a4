"""Crash safety on an embedded SurrealDB: the application process (which owns the
surrealkv file and syncs in-process) is killed -9 at every failpoint of the batch cycle
while it writes; the file reopens after the kill, and a restarted sync makes sink =
source. (``vectorsync run`` cannot sync an embedded file: it lives in the app's process.)"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import SurrealApp, check, sync_once, write_config
from vectorsync._failpoints import POINTS

ROOT = Path(__file__).resolve().parents[2]


def _child(workdir: Path, seed: int, failpoint: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VECTORSYNC_FAILPOINT": failpoint}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src")])
    return subprocess.run(
        [sys.executable, "-m", "tests.e2e.surreal_child", str(seed)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("point", [p for p in POINTS if p != "after_redo_inflight"])
async def test_kill_9_at_each_failpoint_then_restart_converges(workdir: Path, point: str) -> None:
    seed = POINTS.index(point)  # type: ignore[arg-type]
    first = SurrealApp(workdir / "kb")
    first.random_ops(random.Random(100 + seed), 60)
    (workdir / "source.toml").write_text(first.source_toml)
    cfg = write_config(workdir, batch_size=20)
    first.close()  # the child owns the file now
    done = _child(workdir, seed, f"{point}:3")
    assert done.returncode == -9, done.stderr[-2000:]
    assert f"failpoint {point} fired" in done.stderr
    app = SurrealApp(workdir / "kb")  # reopened after the kill
    try:
        await sync_once(cfg)
        await check(cfg, app)
    finally:
        app.close()
