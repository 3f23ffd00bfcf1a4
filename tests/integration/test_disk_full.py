"""A full disk under the qdrant-edge folder is a retryable sink outage, never a crash.

qdrant-edge writes through mmap into sparse files (segments and WAL alike); on a full
filesystem the kernel answers such a write with SIGBUS, which kills the process without a
log line. The sink checks free space before each write instead. These tests mount a real
small tmpfs at the project's qdrant-edge folder and fill it with a file.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import App, assert_edge_converged, load, wait_for, write_config
from vectorsync.errors import SinkError
from vectorsync.model import Point, point_id
from vectorsync.sinks.base import CollectionSpec
from vectorsync.sinks.memory import MemorySink
from vectorsync.sinks.qdrant_edge import QdrantEdgeSink

MIB = 1 << 20
DISK_MIB = 384  # over the default 256 MiB margin, so freeing the filler lets writes resume
VECTORSYNC = [sys.executable, "-m", "vectorsync"]
WIDE = {**os.environ, "COLUMNS": "1000"}  # messages name long paths: do not wrap them


@pytest.fixture
def disk(workdir: Path) -> Iterator[Path]:
    """A real DISK_MIB tmpfs mounted at the project's qdrant-edge folder."""
    folder = workdir / ".vectorsync" / "qdrant"
    folder.mkdir(parents=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={DISK_MIB}m", "tmpfs", str(folder)]
    mounted = subprocess.run(mount, capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)]).returncode != 0:
            subprocess.run(["umount", "--lazy", str(folder)], check=True)


def free_mib(folder: Path) -> float:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize / MIB


def fill(folder: Path, leave_mib: float) -> Path:
    """Allocate a file that leaves about ``leave_mib`` free on the filesystem."""
    filler = folder / "filler"
    size = int((free_mib(folder) - leave_mib) * MIB)
    fd = os.open(filler, os.O_CREAT | os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    assert free_mib(folder) < leave_mib + 1
    return filler


def insert_rows(app: App, keys: range) -> None:
    with app.transaction():
        for k in keys:
            app.insert(k, body=f"body of {k} " * 20)


def died_of(proc: subprocess.Popen[str] | subprocess.CompletedProcess[str]) -> str | None:
    """The name of the signal that killed the process, if one did."""
    code = proc.returncode
    return signal.Signals(-code).name if code is not None and code < 0 else None


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VECTORSYNC, *args], capture_output=True, text=True, env=WIDE, timeout=120
    )


def synced(records: int) -> bool:
    """``vectorsync status``: the sink holds ``records`` points and nothing is pending."""
    done = cli("status", "--json")
    assert done.returncode == 0, done.stderr
    [m] = json.loads(done.stdout)["mappings"]
    return bool(m["lag_changes"] == 0 and m["records"] == records)


def test_a_disk_that_fills_up_pauses_the_sync_until_space_comes_back(
    workdir: Path, app: App, disk: Path
) -> None:
    insert_rows(app, range(1, 11))
    cfg = write_config(workdir)
    # first one run --once: `status` racing a first `run` to create the state tables fails
    assert cli("run", "--once").returncode == 0
    lines: list[str] = []
    with subprocess.Popen(
        [*VECTORSYNC, "run"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=WIDE
    ) as proc:
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr or ()))
        reader.start()
        try:
            insert_rows(app, range(11, 12))
            wait_for(lambda: proc.poll() is not None or synced(11), 120)
            filler = fill(disk, leave_mib=1)  # with the collection open and written to
            insert_rows(app, range(12, 3012))  # ~11 MiB of segment and WAL pages
            wait_for(lambda: proc.poll() is not None or "MiB free under" in "".join(lines), 120)
            if proc.poll() is not None:
                reader.join()
            assert died_of(proc) is None, f"died of {died_of(proc)}: {''.join(lines)}"
            assert proc.poll() is None, f"gave up on a full disk: {''.join(lines)}"
            filler.unlink()  # space comes back while the sync waits
            wait_for(lambda: proc.poll() is not None or synced(3011), 120)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            reader.join()
    log = "".join(lines)
    assert proc.returncode == 0, log
    assert f"MiB free under '{disk}' (need 256 MiB: sinks.vectors.min_free_space)" in log, log
    asyncio.run(assert_edge_converged(load(cfg), app, workdir))


def test_no_room_to_open_the_collection_waits_with_the_fix_and_loses_nothing(
    workdir: Path, app: App, disk: Path
) -> None:
    """Opening a collection writes too: with no room even `run --once` waits (a retryable
    sink outage, logged with the fix) and completes once space comes back."""
    insert_rows(app, range(1, 2001))
    cfg = write_config(workdir)
    filler = fill(disk, leave_mib=1)
    lines: list[str] = []
    with subprocess.Popen(
        [*VECTORSYNC, "run", "--once"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=WIDE,
    ) as proc:
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr or ()))
        reader.start()
        try:
            wait_for(lambda: proc.poll() is not None or "MiB free under" in "".join(lines), 120)
            assert died_of(proc) is None, f"died of {died_of(proc)}: {''.join(lines)}"
            assert proc.poll() is None, f"gave up on a full disk: {''.join(lines)}"
            filler.unlink()
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
            reader.join()
    log = "".join(lines)
    assert proc.returncode == 0, log
    assert (
        f"sink 'vectors': only 1.0 MiB free under '{disk}' "
        "(need 256 MiB: sinks.vectors.min_free_space); free space or lower min_free_space"
    ) in log, log
    asyncio.run(assert_edge_converged(load(cfg), app, workdir))


async def test_problems_report_low_space_until_it_is_freed(disk: Path) -> None:
    sink = QdrantEdgeSink("vectors", disk / "sink", min_free_space=64)
    await sink.open()
    try:
        assert await sink.problems() == []
        filler = fill(disk, leave_mib=32)
        [problem] = await sink.problems()
        assert problem.startswith("sink 'vectors': only ") and "MiB free under" in problem
        assert "(need 64 MiB: sinks.vectors.min_free_space)" in problem
        spec = CollectionSpec(name="c", dimension=4, distance="cosine")
        with pytest.raises(SinkError, match="min_free_space"):  # retryable
            await sink.ensure_collection(spec)
        filler.unlink()
        assert await sink.problems() == []
        await sink.ensure_collection(spec)
    finally:
        await sink.close()


async def test_a_flush_that_finds_the_disk_full_is_a_sink_error_and_loses_nothing(
    disk: Path,
) -> None:
    """Space taken behind the check's back: flushing at close gets ENOSPC (qdrant-edge
    writes its id tracker with write(2)); the sink says so and the WAL keeps the points."""
    spec = CollectionSpec(name="c", dimension=4, distance="cosine")
    sink = QdrantEdgeSink("vectors", disk / "sink")
    await sink.open()
    await sink.ensure_collection(spec)
    points = [Point(id=point_id("m", k), vector=[1.0, 2.0, 3.0, k], payload={}) for k in range(500)]
    await sink.upsert("c", points)
    filler = fill(disk, leave_mib=0)
    with pytest.raises(SinkError, match="No space left on device"):
        await sink.close()
    filler.unlink()
    again = QdrantEdgeSink("vectors", disk / "sink")
    await again.open()  # the lock was released
    try:
        await again.ensure_collection(spec)
        assert await again.count("c") == 500
    finally:
        await again.close()


async def test_memory_sink_problems_follow_its_outage_switch() -> None:
    sink = MemorySink("vectors")
    assert await sink.problems() == []
    sink.down = True
    assert await sink.problems() == ["sink 'vectors' is down"]
