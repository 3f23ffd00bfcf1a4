"""How a command stops: SIGINT and SIGTERM from the start of the process to its end.

The CLI installs one handler first thing (:func:`install`); a command's work runs under
:func:`until_stopped`, which turns the first signal into a stop request: work before a
run's sync is cancelled at once, a syncing run first finishes its batches in flight
(``--stop-timeout``), anything left is given up on after a bounded wait, and the process
then exits without joining stuck threads (:func:`exit_after_stop`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from types import FrameType
from typing import NoReturn, TypeVar

__all__ = [
    "Phase",
    "Stopped",
    "exit_after_stop",
    "install",
    "pause_before_loop",
    "received",
    "until_stopped",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_CLOSE_SECONDS = 5.0  # after a stop cancelled the work: time to close what it opened
# Test hook: pause at a named phase until a signal arrives (``run`` phases: config, open,
# prepare, http; ``prepare:stuck`` also never finishes closing, like a call that hangs).
_PAUSE_ENV = "VECTORSYNC_PAUSE_AT"


class _Signals:
    """SIGINT and SIGTERM for the whole process, from ``main()`` on.

    One handler for the process's lifetime, so there is no moment where asyncio's own
    SIGINT handler (it cancels the main task) or Python's default (KeyboardInterrupt, raised
    wherever the main thread happens to be) is in place. The first signal is a stop request:
    remembered while no event loop runs, so it is never lost; a second one exits at once.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._wake: Callable[[], object] | None = None

    def install(self) -> None:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            os.write(2, b"second signal: exiting now\n")
            os._exit(128 + signum)
        self.received = signum
        if self._wake is not None:
            self._wake()

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a signal"

    @contextlib.contextmanager
    def watching(self, loop: asyncio.AbstractEventLoop) -> Iterator[asyncio.Event]:
        """An event the stop request sets. Python runs handlers in the main thread only:
        when the signal lands on another thread (a model load, a SQLite lane) while the
        loop sleeps in select(), the wakeup fd is what wakes it to run the handler."""
        stop = asyncio.Event()
        main = threading.current_thread() is threading.main_thread()
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        loop.add_reader(reader.fileno(), _drain, reader)
        previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False) if main else -1
        self._wake = partial(loop.call_soon_threadsafe, stop.set)
        if self.received is not None:
            stop.set()
        try:
            yield stop
        finally:
            self._wake = None
            if main:
                signal.set_wakeup_fd(previous)
            loop.remove_reader(reader.fileno())
            reader.close()
            writer.close()


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.recv(4096)


_signals = _Signals()


class Stopped(Exception):
    """A stop request ended the command before its work did."""

    def __init__(self, message: str, *, clean: bool) -> None:
        super().__init__(message)
        self.clean = clean


_PHASES = {
    "open": "opening sources and the state store",
    "prepare": "preparing embedders, sinks and change capture",
    "http": "starting the HTTP server",
    "sync": "syncing",
}


class Phase:
    """How far a run got, for a stop: before "sync" its work is cancelled at once (nothing
    there is worth finishing); during "sync" the run first finishes its batches in flight."""

    def __init__(self, stop_timeout: float) -> None:
        self.name = "start"
        self.stop_timeout = stop_timeout

    async def enter(self, name: str, stop: asyncio.Event) -> None:
        self.name = name
        logger.info(_PHASES[name], extra={"action": "phase", "phase": name})
        pause = os.environ.get(_PAUSE_ENV, "")
        if pause.partition(":")[0] != name:
            return
        _say(f"paused at {name}")
        try:
            await asyncio.sleep(3600)  # a stop cancels it, as all work before the sync
        finally:
            if pause.endswith(":stuck"):  # closing then waits for a call that never returns
                await asyncio.to_thread(time.sleep, 3600)


def pause_before_loop(name: str) -> None:
    if os.environ.get(_PAUSE_ENV) != name:
        return
    _say(f"paused at {name}")
    deadline = time.monotonic() + 600
    while _signals.received is None and time.monotonic() < deadline:
        time.sleep(0.01)


async def until_stopped(work: Callable[[asyncio.Event], Awaitable[T]], phase: Phase | None) -> T:
    """Run ``work`` until it ends or a stop request arrives; then see :func:`_stop`."""
    with _signals.watching(asyncio.get_running_loop()) as stop:
        if stop.is_set():  # the signal came before the loop ran
            raise _stopped_before(phase)
        task = asyncio.ensure_future(work(stop))
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if task.done():
            return task.result()
        return await _stop(task, phase)


async def _stop(task: asyncio.Future[T], phase: Phase | None) -> T:
    """A run that is syncing gets ``stop_timeout`` seconds to finish its batches (a clean
    stop); anything else is cancelled at once. Cancelled work gets _CLOSE_SECONDS to close
    what it opened; past that the command exits without it (a thread in a call that does
    not return, e.g. a model load or a locked database, cannot be interrupted)."""
    drain = phase.stop_timeout if phase is not None and phase.name == "sync" else None
    where = f" during {phase.name}" if phase is not None else ""
    _say(f"stopping ({_signals.name}){where}")
    if drain is not None:
        await asyncio.wait({task}, timeout=drain)
        if task.done():
            return task.result()
    task.cancel()
    await asyncio.wait({task}, timeout=_CLOSE_SECONDS)
    if not task.done():
        raise Stopped(
            f"stopped by {_signals.name}; closing did not finish within "
            f"{_CLOSE_SECONDS:g}s: exiting without waiting for it",
            clean=False,
        )
    if not task.cancelled():  # it ended (or failed) by itself as it was cancelled
        return task.result()
    if drain is None:
        raise _stopped_before(phase)
    raise Stopped(
        f"stopped by {_signals.name}; the batches in flight did not finish within "
        f"{drain:g}s (--stop-timeout): the run is cancelled and the next start replays them",
        clean=False,
    )


def _stopped_before(phase: Phase | None) -> Stopped:
    """Stopped before a run's sync began: clean, nothing was left half-done. Any other
    command was interrupted."""
    if phase is None:
        return Stopped(f"interrupted by {_signals.name}", clean=False)
    return Stopped(f"stopped by {_signals.name} before the sync started", clean=True)


def exit_after_stop(code: object) -> NoReturn:
    """Exit without joining threads: a stop may leave one in a call that does not return
    (a model load, a locked database), which the interpreter would wait for at exit. What
    the command opened is closed (or was given up on) by now."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)


def install() -> None:
    """From here on a signal is a stop request, never lost (call it first in ``main``)."""
    _signals.install()


def received() -> int | None:
    """The signal number of the stop request, if one came."""
    return _signals.received
