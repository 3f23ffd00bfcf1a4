"""SIGINT and SIGTERM stop `vectorsync run` at any moment after it starts: promptly, and
cleanly where they can (the batches in flight committed, the run recorded).

Each signal lands in its phase by an observable condition, never by timing: a line the
process prints when it pauses at a phase (``VECTORSYNC_PAUSE_AT``), a log line, or a line
from a stand-in model whose load or encode never returns (as a real model load does not,
for many seconds, in a thread no signal reaches)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import App, check, load, wait_for, write_config
from vectorsync.engine import Engine

DEADLINE = 60.0  # a stop must end the process well within this on a loaded machine

FAKE_MODEL = {
    "torch/__init__.py": "def set_num_threads(n):\n    pass\n",
    "transformers/__init__.py": (
        "from types import SimpleNamespace\n"
        "utils = SimpleNamespace(logging=SimpleNamespace(disable_progress_bar=lambda: None))\n"
    ),
    "sentence_transformers/__init__.py": """
import os
import sys
import time


def _step(where):
    print(f"fake model: {where}", file=sys.stderr, flush=True)
    if os.environ.get("FAKE_MODEL_HANGS") == where:
        time.sleep(3600)


class _Array(list):
    def tolist(self):
        return list(self)


class SentenceTransformer:
    def __init__(self, folder, device):
        _step("loading")

    def get_embedding_dimension(self):
        return 8

    def encode(self, texts, **kwargs):
        _step("encoding")
        return _Array([[1.0] + [0.0] * 7 for _ in texts])
""",
    "model/modules.json": "[]\n",
}


class Cli:
    """`vectorsync` as a subprocess; its stderr goes to a file the test reads."""

    def __init__(self, workdir: Path, args: tuple[str, ...], env: dict[str, str]) -> None:
        self.log = workdir / f"stderr-{len(list(workdir.glob('stderr-*')))}.log"
        with self.log.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vectorsync", *args],
                cwd=workdir,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env={**os.environ, **env},
            )

    @property
    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def said(self) -> str:
        """stderr with rich's line wrapping undone."""
        return " ".join(self.stderr.split())

    def wait_for_line(self, text: str) -> None:
        wait_for(lambda: text in self.stderr or self.proc.poll() is not None, DEADLINE)
        assert text in self.stderr, f"exited {self.proc.returncode}:\n{self.stderr}"

    def stop(self, sig: signal.Signals = signal.SIGINT) -> int:
        """Send ``sig``; the exit code, which must come within the deadline."""
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"still running {DEADLINE:g}s after {sig.name}:\n{self.stderr}")


@pytest.fixture
def start(workdir: Path) -> Iterator[Callable[..., Cli]]:
    started: list[Cli] = []

    def launch(*args: str, env: dict[str, str] | None = None) -> Cli:
        cli = Cli(workdir, args, env or {})
        started.append(cli)
        return cli

    yield launch
    for cli in started:
        if cli.proc.poll() is None:
            cli.proc.kill()
            cli.proc.wait()


@pytest.fixture
def fake_model(workdir: Path) -> dict[str, str]:
    """Environment that makes the sentence-transformers embedder load the stand-in model."""
    root = workdir / "fakes"
    for name, text in FAKE_MODEL.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}


def use_fake_model(config: Path) -> None:
    model = config.parent / "fakes" / "model"
    text = config.read_text()
    config.write_text(
        text.replace('kind = "hash"', f'kind = "sentence-transformers"\nmodel = "{model}"')
    )


def run_statuses(workdir: Path) -> list[str]:
    db = workdir / ".vectorsync" / "state.db"
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(db)) as conn:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
        if "sync_runs" not in tables:
            return []
        return [status for (status,) in conn.execute("SELECT status FROM sync_runs ORDER BY id")]


def capture_installed(app: App) -> bool:
    found = app.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'trigger'")
    return found != [(0,)]


@pytest.mark.parametrize("phase", ["config", "open", "prepare"])
def test_a_stop_before_the_sync_starts_exits_0_with_nothing_done(
    workdir: Path, app: App, start: Callable[..., Cli], phase: str
) -> None:
    app.insert(1)
    write_config(workdir)
    cli = start("run", "-v", env={"VECTORSYNC_PAUSE_AT": phase})
    cli.wait_for_line(f"paused at {phase}")
    assert cli.stop() == 0, cli.stderr
    assert "stopped by SIGINT before the sync started" in cli.said
    assert run_statuses(workdir) == []
    assert not capture_installed(app)


def test_serve_stops_while_its_http_server_starts(
    workdir: Path, app: App, start: Callable[..., Cli]
) -> None:
    app.insert(1)
    path = write_config(workdir)
    path.write_text(path.read_text() + "[http]\nport = 0\n")
    cli = start("serve", env={"VECTORSYNC_PAUSE_AT": "http"})
    cli.wait_for_line("paused at http")
    assert cli.stop() == 0, cli.stderr
    assert "before the sync started" in cli.said
    assert run_statuses(workdir) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_during_a_model_load_that_does_not_return_exits_0(
    workdir: Path,
    app: App,
    start: Callable[..., Cli],
    fake_model: dict[str, str],
    sig: signal.Signals,
) -> None:
    app.insert(1)
    use_fake_model(write_config(workdir))
    cli = start("run", env={**fake_model, "FAKE_MODEL_HANGS": "loading"})
    cli.wait_for_line("fake model: loading")
    assert cli.stop(sig) == 0, cli.stderr
    assert f"stopped by {sig.name} before the sync started" in cli.said
    assert run_statuses(workdir) == []


def test_a_stop_while_streaming_commits_and_records_the_run(
    workdir: Path, app: App, start: Callable[..., Cli]
) -> None:
    for k in range(1, 21):
        app.insert(k)
    path = write_config(workdir)
    cli = start("run", "-v")
    cli.wait_for_line("batch committed")
    assert cli.stop() == 0, cli.stderr
    assert "20 changes in" in cli.said
    assert run_statuses(workdir) == ["completed"]
    asyncio.run(check(path, app))


def test_batches_that_outlast_the_stop_timeout_are_cancelled_and_replayed(
    workdir: Path, app: App, start: Callable[..., Cli], fake_model: dict[str, str]
) -> None:
    app.insert(1)
    use_fake_model(write_config(workdir))
    cli = start("run", "--stop-timeout", "0.5", env={**fake_model, "FAKE_MODEL_HANGS": "encoding"})
    cli.wait_for_line("fake model: encoding")
    assert cli.stop() == 130, cli.stderr
    assert "did not finish within 0.5s (--stop-timeout)" in cli.said
    assert run_statuses(workdir) == ["cancelled"]
    again = start("run", "--once", env=fake_model)
    assert again.proc.wait(timeout=DEADLINE) == 0, again.stderr
    assert "1 change in" in again.said and "1 embedded" in again.said


def test_a_stop_exits_within_its_bound_when_closing_never_finishes(
    workdir: Path, app: App, start: Callable[..., Cli]
) -> None:
    app.insert(1)
    write_config(workdir)
    cli = start("run", env={"VECTORSYNC_PAUSE_AT": "prepare:stuck"})
    cli.wait_for_line("paused at prepare")
    assert cli.stop() == 130, cli.stderr
    assert "closing did not finish within 5s" in cli.said


def test_a_second_signal_exits_at_once(
    workdir: Path, app: App, start: Callable[..., Cli], fake_model: dict[str, str]
) -> None:
    app.insert(1)
    use_fake_model(write_config(workdir))
    cli = start("run", "--stop-timeout", "600", env={**fake_model, "FAKE_MODEL_HANGS": "encoding"})
    cli.wait_for_line("fake model: encoding")
    cli.proc.send_signal(signal.SIGINT)
    cli.wait_for_line("stopping (SIGINT) during sync")
    assert cli.stop(signal.SIGTERM) == 128 + signal.SIGTERM, cli.stderr
    assert "second signal: exiting now" in cli.said


async def test_a_cancelled_run_leaves_no_worker_running(workdir: Path, app: App) -> None:
    app.insert(1)
    config = load(write_config(workdir))
    async with Engine.open(config) as engine:
        committed = asyncio.Event()
        run = asyncio.create_task(engine.run(on_batch=lambda _: committed.set()))
        await asyncio.wait_for(committed.wait(), DEADLINE)  # streaming: the workers run
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in left:  # what a fixed engine would have done, so the close is clean
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
    assert left == []
    assert run_statuses(workdir) == ["cancelled"]
