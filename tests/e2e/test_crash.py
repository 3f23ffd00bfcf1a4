"""Crash safety: kill -9 ``vectorsync run`` while the app writes; after restart and
``run --once`` the sink equals the source — nothing lost, nothing stale, no duplicate
points. Each trial of the main test dies at a failpoint of the batch cycle, on a pass the
test chooses, so the kills land where they are meant to however loaded the machine is;
the slow extra kills at random moments."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import App, assert_converged, assert_edge_converged, check, load, write_config
from tests.tcp_proxy import tcp_proxy
from vectorsync._failpoints import POINTS
from vectorsync.falkordb_server import FalkorDBServer
from vectorsync.sinks.chroma import ChromaSink

TRIALS = 16  # shared by the failpoints, two after two
ONCE_PER_RUN = {"after_redo_inflight"}  # passed once at start: only its first pass exists
RANDOM_TRIALS = 8
# how long a trial may take to reach its failpoint: generous, for a loaded machine
DEADLINE = 120.0
RUN = [sys.executable, "-m", "vectorsync", "run"]
REDONE = "they are rewritten"  # the warning of a run that redoes a dead run's sink writes


@pytest.fixture(autouse=True)
def _a_cli_run_can_open_the_source(request: pytest.FixtureRequest) -> None:
    """These trials kill ``vectorsync run``: an embedded SurrealDB lives in the app's own
    process, which no CLI run can share (its trials: tests/e2e/test_surreal_crash.py)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("source_kind") == "surrealdb":
        pytest.skip("embedded SurrealDB: killed in the app's process by test_surreal_crash.py")


def _env(failpoint: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "VECTORSYNC_FAILPOINT"}
    return env if failpoint is None else {**env, "VECTORSYNC_FAILPOINT": failpoint}


@contextlib.contextmanager
def _writing(app: App, seed: int) -> Iterator[None]:
    """The app keeps writing (on a connection of its own) until the block ends."""
    stop = threading.Event()

    def write() -> None:
        own = app.clone()
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                own.random_ops(rng, 5)
                # pacing the load, not synchronisation: a writer that never lets go of
                # SQLite's lock would starve the sync's reads and acks
                time.sleep(0.01)
        finally:
            own.close()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        yield
    finally:
        stop.set()
        writer.join()


def _start(workdir: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        RUN, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _restart_converges(workdir: Path, cfg: Path, app: App, rng: random.Random) -> str:
    """More writes, then a clean ``run --once``: the sink must equal the source. Its
    stderr."""
    app.random_ops(rng, 50)
    done = subprocess.run(
        [*RUN, "--once"], cwd=workdir, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    asyncio.run(check(cfg, app))
    return done.stderr


def _schedule(rng: random.Random, trials: int) -> list[tuple[str, int]]:
    """Kills at each failpoint in turn, on the pass of the batch cycle each trial chooses:
    alternately some batches in (catching up, or tailing the writer) and at the first pass
    (that run dies while replaying what the previous one left)."""
    per_point = max(1, trials // len(POINTS))
    return [
        (point, 1 if t % 2 or point in ONCE_PER_RUN else rng.randint(2, 6))
        for t in range(trials)
        for point in [POINTS[t // per_point % len(POINTS)]]
    ]


@pytest.mark.all_sources
@pytest.mark.all_sinks
def test_kill_9_at_every_failpoint_of_the_batch_cycle_loses_nothing(
    workdir: Path, app: App
) -> None:
    rng = random.Random(20261123)
    app.random_ops(rng, 300)
    cfg = write_config(workdir, batch_size=20)
    _kill_and_converge(workdir, cfg, app, rng, _schedule(rng, TRIALS))


@pytest.mark.all_sources
def test_kill_9_at_every_failpoint_with_chunking_leaves_no_chunk_behind(
    workdir: Path, app: App
) -> None:
    """The same trials on a chunked mapping (two to four chunks a row): after the kills,
    every chunk point equals a chunking of its current row and no other point is left."""
    rng = random.Random(20261201)
    app.random_ops(rng, 200)
    chunking = '[mappings.chunking]\nunit = "chars"\nsize = 24'
    cfg = write_config(workdir, batch_size=20, extra_mapping=chunking)
    _kill_and_converge(workdir, cfg, app, rng, _schedule(rng, len(POINTS)))


def test_kill_9_with_several_sinks_one_going_down_and_back_loses_nothing(
    workdir: Path, app: App, falkordb: FalkorDBServer, graph_name: str
) -> None:
    """The failpoint trials on a mapping written to qdrant-edge and FalkorDB, the graph
    cut off in every other trial (its share left in the backlog, or caught up, when the
    kill lands): afterwards both sinks equal the source."""
    with tcp_proxy(falkordb.url) as proxy:
        url = proxy.url_for(falkordb.url)
        graph = f'kind = "falkordb"\nurl = "{url}"\ngraph = "sink_{graph_name}"'
        rng = random.Random(20261202)
        app.random_ops(rng, 200)
        also = {"graph": graph}
        cfg = write_config(workdir, batch_size=20, also=also, sync="sink_outage_after = 0.3")

        def toggle(trial: int) -> None:
            if trial >= 0 and trial % 2 == 0:
                proxy.cut()
            else:
                proxy.restore()

        _kill_and_converge(workdir, cfg, app, rng, _schedule(rng, len(POINTS)), toggle)


def _kill_and_converge(
    workdir: Path,
    cfg: Path,
    app: App,
    rng: random.Random,
    schedule: list[tuple[str, int]],
    each: Callable[[int], None] | None = None,
) -> None:
    """Kill a run at each (failpoint, pass) of ``schedule`` while the app writes, then a
    clean run must converge; ``each(trial)`` runs before each trial (and with ``-1``
    before the clean run)."""
    logs: list[str] = []
    for trial, (point, n) in enumerate(schedule):
        if each is not None:
            each(trial)
        with _writing(app, seed=trial):
            proc = _start(workdir, _env(f"{point}:{n}"))
            try:
                _, stderr = proc.communicate(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, stderr = proc.communicate()
                pytest.fail(
                    f"trial {trial}: vectorsync run did not pass {point} {n} times within "
                    f"{DEADLINE:g}s while the app kept writing; its stderr:\n{stderr}"
                )
        assert proc.returncode == -signal.SIGKILL, f"trial {trial} exited on its own:\n{stderr}"
        assert f"failpoint {point} fired" in stderr, stderr
        logs.append(stderr)
    if each is not None:
        each(-1)
    logs.append(_restart_converges(workdir, cfg, app, rng))
    # a kill between the sink writes and the state commit leaves journaled writes to redo
    assert any(REDONE in log for log in logs[1:]), "no run redid a dead run's sink writes"


@pytest.mark.slow
@pytest.mark.all_sources
def test_kill_9_at_random_moments_loses_nothing(workdir: Path, app: App) -> None:
    """An extra to the failpoint trials: kills wherever they land (starting up, reading,
    embedding, writing); only convergence is asserted, not where they landed."""
    rng = random.Random(20261124)
    app.random_ops(rng, 300)
    cfg = write_config(workdir, batch_size=20)
    for trial in range(RANDOM_TRIALS):
        with _writing(app, seed=trial):
            proc = _start(workdir, _env())
            try:
                _, stderr = proc.communicate(timeout=rng.uniform(0.3, 2.5))
            except subprocess.TimeoutExpired:
                proc.kill()
                _, stderr = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, f"trial {trial} exited on its own:\n{stderr}"
    _restart_converges(workdir, cfg, app, rng)


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
    vectorsync = [*RUN, "--once"]
    assert subprocess.run(vectorsync, cwd=workdir, env=_env(), timeout=120).returncode == 0
    if edit is None:
        app.delete(1)
    else:
        app.update(1, **edit)
    died = subprocess.run(
        vectorsync,
        cwd=workdir,
        env=_env("after_sink_write:1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert "failpoint after_sink_write fired" in died.stderr
    if edit is None:
        app.insert(1, author="ann", body="the body")
    else:
        app.update(1, author="ann", body="the body")
    done = subprocess.run(
        vectorsync, cwd=workdir, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    asyncio.run(assert_edge_converged(load(cfg), app, workdir))


@pytest.mark.parametrize("edit", [{"body": "a new body"}, {"author": "bob"}])
def test_kill_9_after_a_chroma_write_redoes_it_on_restart(
    workdir: Path, app: App, edit: dict[str, str]
) -> None:
    """Chroma re-writes a point as delete + add: a run killed after that write (before its
    state commit) is redone by the next run, and Chroma ends equal to the source."""
    for k in range(1, 21):
        app.insert(k, author="ann", body=f"body {k}")
    cfg = write_config(workdir, sink='kind = "chroma"\npath = ".vectorsync/chroma"')
    vectorsync = [*RUN, "--once"]
    assert subprocess.run(vectorsync, cwd=workdir, env=_env(), timeout=120).returncode == 0
    for k in (3, 4, 5):
        app.update(k, **edit)
    died = subprocess.run(
        vectorsync,
        cwd=workdir,
        env=_env("after_sink_write:1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert died.returncode == -signal.SIGKILL, died.stderr
    app.update(4, author="ann", body="body 4")  # one row goes back to what was committed
    done = subprocess.run(
        vectorsync, cwd=workdir, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert REDONE in done.stderr

    async def converged() -> None:
        sink = ChromaSink("check", path=workdir / ".vectorsync" / "chroma")
        await sink.open()
        try:
            await assert_converged(load(cfg), app, sink)
        finally:
            await sink.close()

    asyncio.run(converged())
