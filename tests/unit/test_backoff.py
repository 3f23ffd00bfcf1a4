from __future__ import annotations

import pytest

from vectorsync.backoff import Backoff, retrying
from vectorsync.errors import PermanentError, SourceError


async def test_retries_transient_errors_then_reports_recovery() -> None:
    calls, seen, recovered = [], [], []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise SourceError("locked", code="SQLITE_BUSY")
        return "ok"

    async def on_retry(exc: Exception, attempt: int) -> None:
        seen.append((type(exc).__name__, attempt))

    async def on_recovered(attempts: int) -> None:
        recovered.append(attempts)

    fast = Backoff(initial=0.001, maximum=0.002)
    assert await retrying("x", flaky, fast, on_retry=on_retry, on_recovered=on_recovered) == "ok"
    assert seen == [("SourceError", 1), ("SourceError", 2)] and recovered == [2]


async def test_gives_up_after_max_attempts_and_never_retries_permanent_errors() -> None:
    calls = []

    async def down() -> None:
        calls.append(1)
        raise SourceError("down")

    with pytest.raises(SourceError):
        await retrying("x", down, Backoff(initial=0.001, maximum=0.001, max_attempts=3))
    assert len(calls) == 4

    async def bad() -> None:
        calls.append(1)
        raise PermanentError("bad")

    with pytest.raises(PermanentError):
        await retrying("x", bad, Backoff(initial=0.001))
    assert len(calls) == 5


def test_full_jitter_is_bounded_by_the_exponential_cap() -> None:
    b = Backoff(initial=0.1, maximum=2.0)
    assert all(0 <= b.delay(n) <= min(2.0, 0.1 * 2**n) for n in range(12) for _ in range(20))
