"""An application with an embedded SurrealDB that syncs in its own process (as it must):
it writes random changes while its engine streams, and dies wherever VECTORSYNC_FAILPOINT
says. Run by tests/e2e/test_surreal_crash.py as ``python -m tests.e2e.surreal_child SEED``
in the project folder."""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

from tests.helpers import SurrealApp, load
from vectorsync.engine import Engine


async def main(seed: int) -> None:
    app = SurrealApp(Path.cwd() / "kb")
    rng = random.Random(seed)
    async with Engine.open(load(Path("vectorsync.toml"))) as engine:
        stop = asyncio.Event()
        streaming = asyncio.create_task(engine.run(stop=stop))
        for _ in range(40):
            app.random_ops(rng, 5)
            await asyncio.sleep(0.01)  # pacing the writes, not synchronisation
        await engine.wait_for(await engine.head(), timeout=60)
        stop.set()
        await streaming
    app.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
