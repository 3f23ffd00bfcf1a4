"""A throwaway Chroma server (``chroma run``, shipped by the ``chromadb`` package) on a free
port of 127.0.0.1, for tests (ours and yours) and benchmarks. Telemetry is off; its data
folder is removed when the context ends::

    with chroma_server() as server:
        ...  # server.url == "http://127.0.0.1:<port>"
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._processes import stop_process
from .errors import ConfigError
from .falkordb_server import free_port

__all__ = ["ChromaServer", "chroma_server"]

# chromadb's own ``chroma`` script, started by this interpreter wherever its bin folder is
_RUN = "import sys, chromadb_rust_bindings; chromadb_rust_bindings.cli(['chroma', *sys.argv[1:]])"


class ChromaServer:
    def __init__(self) -> None:
        try:
            import chromadb_rust_bindings  # type: ignore[import-untyped]  # noqa: F401
        except ImportError:
            raise ConfigError(
                "starting a local Chroma server needs the PyPI package chromadb "
                "(pip install 'vectorsync[chroma]')"
            ) from None
        self.root = Path(tempfile.mkdtemp(prefix="vectorsync-chroma-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._cmd = [
            sys.executable,
            "-c",
            _RUN,
            "run",
            "--path",
            str(self.root / "data"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, deadline: float = 60.0) -> None:
        env = {**os.environ, "ANONYMIZED_TELEMETRY": "False"}
        with (self.root / "server.log").open("ab") as log:
            self._proc = subprocess.Popen(
                self._cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root
            )
        end = time.monotonic() + deadline
        while not self._answers():
            if self._proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError(
                    f"Chroma did not start: {(self.root / 'server.log').read_text()[-4000:]}"
                )
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/api/v2/heartbeat", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def clear(self) -> None:
        """Delete every collection (between tests sharing one server). Each one's records
        go first: Chroma 1.5 leaves list-valued metadata of a deleted collection behind
        for the next records to inherit (chroma-core/chroma#7594)."""
        base = f"{self.url}/api/v2/tenants/default_tenant/databases/default_database/collections"
        for found in _call(base):
            while ids := _call(f"{base}/{found['id']}/get", {"include": [], "limit": 1000})["ids"]:
                _call(f"{base}/{found['id']}/delete", {"ids": ids})
            _call(f"{base}/{found['name']}", method="DELETE")

    def stop(self) -> None:
        stop_process(self._proc)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _call(url: str, body: Any = None, *, method: str | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read() or b"null")


@contextlib.contextmanager
def chroma_server() -> Iterator[ChromaServer]:
    server = ChromaServer()
    try:
        server.start()
        yield server
    finally:
        server.destroy()
