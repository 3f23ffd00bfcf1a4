"""Exponential backoff with full jitter and a give-up deadline (psycopg_pool style)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from .errors import RetryableError, describe

__all__ = ["Backoff", "retrying"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    initial: float = 0.1
    maximum: float = 10.0
    factor: float = 2.0
    deadline: float | None = 300.0  # seconds of consecutive failures before giving up; None: never
    max_attempts: int | None = 100  # retries before giving up, whichever limit comes first

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.maximum, self.initial * self.factor**attempt))


async def retrying(
    what: str,
    call: Callable[[], Awaitable[T]],
    backoff: Backoff,
    stop: asyncio.Event | None = None,
    *,
    on_retry: Callable[[RetryableError, int], Awaitable[None]] | None = None,
    on_recovered: Callable[[int], Awaitable[None]] | None = None,
) -> T:
    """Run ``call``; on RetryableError wait and try again until the deadline passes.

    Waiting is interruptible: a set ``stop`` event ends the wait and re-raises the last error.
    ``on_retry(error, attempt)`` hears of each failure that will be retried and
    ``on_recovered(attempts)`` of success after failures (e.g. to keep an error log).
    """
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            result = await call()
        except RetryableError as exc:
            elapsed = time.monotonic() - started
            if backoff.deadline is not None and elapsed >= backoff.deadline:
                raise
            if backoff.max_attempts is not None and attempt >= backoff.max_attempts:
                raise
            delay = backoff.delay(attempt)
            attempt += 1
            logger.warning(
                "%s failed (attempt %d), retrying in %.2fs: %s",
                what,
                attempt,
                delay,
                describe(exc),
                extra={"action": "retry", "what": what, "attempt": attempt},
            )
            if on_retry is not None:
                await on_retry(exc, attempt)
            if stop is None:
                await asyncio.sleep(delay)
            else:
                try:
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                except TimeoutError:
                    continue
                raise
            continue
        if attempt and on_recovered is not None:
            await on_recovered(attempt)
        return result
