"""A running sync serves the commands that need its sinks.

A qdrant-edge folder (and qdrant-client's local mode) has one writer: while ``vectorsync
run`` streams, another process cannot open it to search or check. So ``run`` serves the
HTTP API on a Unix socket beside its config (``.vectorsync/control.sock``, mode 0600: this
user only), and ``vectorsync search`` / ``check`` from another shell go through it — no
second model load, no lock to wait for. The socket needs the ``http`` extra (starlette,
uvicorn); without it a command says exactly how to reach the running process.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from .config import Config
from .errors import VectorsyncError

__all__ = ["Control", "find", "serving", "socket_path"]

logger = logging.getLogger(__name__)

_MAX_PATH = 100  # sun_path holds 108 bytes


class ControlError(VectorsyncError):
    """The running sync answered a command with an error."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message, code=str(status))
        self.status = status


def socket_path(config: Config) -> Path:
    return config.resolve(Path(".vectorsync") / "control.sock")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self._path))
        self.sock = sock


class Control:
    """A client of a running sync's control socket."""

    def __init__(self, path: Path, *, timeout: float = 600.0) -> None:
        self.path = path
        self.timeout = timeout

    def request(
        self, method: str, route: str, params: Mapping[str, Any] | Sequence[tuple[str, Any]]
    ) -> Any:
        """The JSON body of the answer; ControlError with the server's message if it refused."""
        conn = _UnixConnection(self.path, self.timeout)
        try:
            query = urlencode(params, doseq=True)
            conn.request(method, f"{route}?{query}", headers={"X-Vectorsync": "1"})
            answer = conn.getresponse()
            body = json.loads(answer.read() or b"{}")
        finally:
            conn.close()
        if answer.status >= 400:
            raise ControlError(str(body.get("error", body)), status=answer.status)
        return body


def find(config: Config) -> Control | None:
    """A client of the sync running on this config, if one answers on its socket."""
    path = socket_path(config)
    if not path.exists():
        return None
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2.0)
        probe.connect(str(path))
    except OSError:  # left behind by a process that died
        return None
    finally:
        probe.close()
    return Control(path)


@contextlib.asynccontextmanager
async def serving(app: Any, config: Config) -> AsyncIterator[Path | None]:
    """Serve ``app`` on the config's control socket while the block runs; yields the path,
    or None when it cannot be served (no http extra, a path too long for a socket)."""
    path = socket_path(config)
    try:
        import uvicorn
    except ImportError:
        yield None
        return
    if len(str(path).encode()) > _MAX_PATH:
        logger.warning(
            "control socket path %s is too long for a Unix socket: other commands cannot "
            "reach this sync through it",
            path,
            extra={"action": "control_socket"},
        )
        yield None
        return
    if find(config) is not None:  # another sync serves this config (its lease refuses us)
        yield None
        return
    sock = _bind(path)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
    )
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield path
    finally:
        server.should_exit = True
        await asyncio.gather(task, return_exceptions=True)
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _bind(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # left by a process that died (a live one answered find())
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    return sock
