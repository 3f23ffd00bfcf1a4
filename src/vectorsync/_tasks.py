"""Task helpers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any


async def gather_or_fail(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Wait for all tasks; the first failure cancels the rest and is raised as itself (not
    wrapped in an ExceptionGroup, so callers' ``except`` clauses keep working)."""
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except asyncio.CancelledError:  # the caller is cancelled: so is every task, before it
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    for t in done:
        exc = t.exception()
        if exc is not None:
            for p in pending:
                p.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            raise exc
    if pending:
        await asyncio.gather(*pending)
