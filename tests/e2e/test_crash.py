"""Crash safety: kill -9 ``vectorsync run`` at random moments while the app writes; after
restart and ``run --once`` the sink equals the source — nothing lost, nothing stale, no
duplicate points."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import App, assert_edge_converged, load, write_config

TRIALS = 24


def _writer(connect: Callable[[], App], rng: random.Random, stop: threading.Event) -> None:
    app = connect()  # a connection of the writer thread's own
    try:
        while not stop.is_set():
            app.random_ops(rng, 5)
    finally:
        app.close()


@pytest.mark.slow
@pytest.mark.all_sources
def test_kill_9_at_random_moments_loses_nothing(workdir: Path, app: App) -> None:
    rng = random.Random(20261123)
    app.random_ops(rng, 300)
    cfg = write_config(workdir, batch_size=20)
    failpoints = ["after_sink_write", "after_state_commit"]
    self_killed = 0
    for trial in range(TRIALS):
        env = dict(os.environ)
        if trial % 3 == 0:  # a third of the trials die exactly between two writes
            env["VECTORSYNC_FAILPOINT"] = f"{failpoints[trial % 2]}:{rng.randint(1, 4)}"
        stop = threading.Event()
        writer = threading.Thread(target=_writer, args=(app.clone, random.Random(trial), stop))
        writer.start()
        proc = subprocess.Popen(
            [sys.executable, "-m", "vectorsync", "run"],
            cwd=workdir,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            try:
                proc.wait(timeout=rng.uniform(0.8, 2.5))
                self_killed += 1  # died on its own: a failpoint fired
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
            _, stderr = proc.communicate(timeout=30)
        finally:
            stop.set()
            writer.join()
        assert proc.returncode == -signal.SIGKILL, stderr.decode()
    app.random_ops(rng, 50)
    done = subprocess.run(
        [sys.executable, "-m", "vectorsync", "run", "--once"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr

    asyncio.run(assert_edge_converged(load(cfg), app, workdir))
    assert self_killed >= TRIALS // 6, "too few trials died between the sink and state writes"


@pytest.mark.all_sources
@pytest.mark.parametrize(
    "edit",
    [
        {"author": "bob"},  # a payload-only write
        {"body": "a new body"},  # a re-embedded text
        None,  # a delete
    ],
)
def test_a_write_the_crash_left_uncommitted_is_redone_even_if_the_row_reverted(
    workdir: Path, app: App, edit: dict[str, str] | None
) -> None:
    """kill -9 between the sink write and the state commit, then the row goes back to what
    the state store last recorded: the replay must not trust that record (the sink holds
    the uncommitted write) and must write the row as it is."""
    app.insert(1, author="ann", body="the body")
    app.insert(2)
    cfg = write_config(workdir)
    vectorsync = [sys.executable, "-m", "vectorsync", "run", "--once"]
    assert subprocess.run(vectorsync, cwd=workdir, timeout=120).returncode == 0
    if edit is None:
        app.delete(1)
    else:
        app.update(1, **edit)
    env = {**os.environ, "VECTORSYNC_FAILPOINT": "after_sink_write:1"}
    died = subprocess.run(vectorsync, cwd=workdir, env=env, timeout=120)
    assert died.returncode == -signal.SIGKILL
    if edit is None:
        app.insert(1, author="ann", body="the body")
    else:
        app.update(1, author="ann", body="the body")
    done = subprocess.run(vectorsync, cwd=workdir, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    asyncio.run(assert_edge_converged(load(cfg), app, workdir))
