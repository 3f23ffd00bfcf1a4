"""An application writing through the write API while its engine streams, dying wherever
VECTORSYNC_FAILPOINT says (an embedded SurrealDB file: opened here, the parent closed it).
Run by tests/integration/test_writer.py as ``python -m tests.e2e.writer_child KEY`` in the
project folder."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from tests.helpers import SurrealApp, load, streaming
from vectorsync.engine import Engine


async def main(key: int) -> None:
    config = load(Path("vectorsync.toml"))
    if config.sources["app"].kind == "surrealdb":  # the embedded file is this process's
        SurrealApp(Path.cwd() / "kb")  # opened and shared with the engine
    async with Engine.open(config) as engine:
        await engine.prepare()
        async with streaming(engine), engine.writer("app", consistency="strong") as w:
            row = {"id": key, "title": f"written {key}", "body": "through the writer"}
            await w.upsert("articles", {**row, "author": "w", "tags": "t", "published": 1})


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
