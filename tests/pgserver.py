"""A throwaway PostgreSQL 15 cluster on a free port, for tests and benchmarks.

``initdb`` refuses to run as root, so the cluster belongs to the ``postgres`` system user
when the tests run as root. Connections over TCP need a password (SCRAM), so every test
that uses ``url`` also exercises password handling; the fixture itself talks through the
cluster's own Unix socket.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

from vectorsync.falkordb_server import free_port

__all__ = ["PASSWORD", "PgServer", "pg_server"]

BIN = Path("/usr/lib/postgresql/15/bin")
USER = "vs_app"
PASSWORD = "s3cret-pa55"


def _as_owner() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


class PgServer:
    def __init__(self, *, wal_level: str = "logical") -> None:
        self.root = Path(tempfile.mkdtemp(prefix="vectorsync-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.wal_level = wal_level
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if not self.data.exists():
            self._init()
        self._ctl("start", "-w", "-t", "60", "-l", str(self.root / "server.log"))

    def stop(self, mode: str = "fast") -> None:
        self._ctl("stop", "-w", "-m", mode)

    def restart_immediate(self) -> None:
        """``pg_ctl restart -m immediate``: a crash as far as the server is concerned."""
        self._ctl("restart", "-w", "-m", "immediate", "-l", str(self.root / "server.log"))

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def _init(self) -> None:
        subprocess.run(
            [
                *_as_owner(),
                str(BIN / "initdb"),
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
        )
        conf = [
            f"port = {self.port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{self.root}'",
            f"wal_level = {self.wal_level}",
            "max_replication_slots = 20",
            "max_wal_senders = 20",
            "max_connections = 200",
            "fsync = on",
            "synchronous_commit = on",
            "shared_buffers = 128MB",
        ]
        with (self.data / "postgresql.conf").open("a") as f:
            f.write("\n".join(conf) + "\n")
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host replication all 127.0.0.1/32 scram-sha-256\n"
        )

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            [*_as_owner(), str(BIN / "pg_ctl"), "-D", str(self.data), *args],
            check=True,
            capture_output=True,
        )

    # -- access ---------------------------------------------------------------------------
    def admin(self, dbname: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        """A superuser connection over the cluster's socket (no password)."""
        return psycopg.connect(
            host=str(self.root), port=self.port, user="postgres", dbname=dbname, autocommit=True
        )

    def create_database(self, name: str) -> str:
        """A fresh database owned by the password-protected application role; its URL."""
        with self.admin() as conn:
            if (
                conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (USER,)).fetchone()
                is None
            ):
                conn.execute(
                    f"CREATE ROLE {USER} LOGIN SUPERUSER REPLICATION PASSWORD '{PASSWORD}'"
                )
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}" OWNER {USER}')
        return self.url(name)

    def url(self, dbname: str) -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{dbname}"

    def wait_ready(self, deadline: float = 60.0) -> None:
        end = time.monotonic() + deadline
        while True:
            try:
                with self.admin():
                    return
            except psycopg.OperationalError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)


@contextlib.contextmanager
def pg_server(**kwargs: str) -> Iterator[PgServer]:
    server = PgServer(**kwargs)
    try:
        server.start()
        yield server
    finally:
        server.destroy()
