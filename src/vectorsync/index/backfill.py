"""The backfill manager's unit of work: one target (an index version being built) filled
from a keyset scan of the source, a page at a time, inside the sync pipeline.

Pages are planned like any batch (re-read, render, compare, embed through the cache, write,
commit), between the live changes, so a live change and a backfill page of the same key
never race: whichever the pipeline plans later reads the newer row. Each page's commit
carries the checkpoint (the last key), so a crash resumes after it. The page size adapts
(additive increase, multiplicative decrease) toward a target batch time, so a slow embedder
gets small pages and a fast one large ones; memory stays bounded by the page.

The records of a backfill planned but not committed yet stay within one budget (the sync's
batch size): what a crash throws away — texts embedded for pages whose commit never came —
is at most one batch per crash. Pages are at most half of it, so two are in flight (one
embedding while the other is written).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..model import Key

if TYPE_CHECKING:
    from ..worker import MappingRuntime

__all__ = ["Backfill"]

MIN_PAGE, MAX_PAGE, STEP = 16, 2000, 64


@dataclass(slots=True, kw_only=True)
class Backfill:
    target: MappingRuntime
    after: Key | None = None  # the checkpoint: every key up to it is written
    done: int = 0  # records written by this backfill (all runs)
    total: int | None = None  # an estimate, for progress
    page: int = 128
    target_seconds: float = 2.0
    finished: bool = False
    started: float = field(default_factory=time.monotonic)
    embedded: int = 0
    done_at_start: int = -1
    budget: int = 2 * MAX_PAGE  # records planned and not committed, at most
    inflight: int = 0  # records planned and not committed yet

    @property
    def mapping(self) -> str:
        return self.target.config.name

    @property
    def version(self) -> int:
        return self.target.version

    def __post_init__(self) -> None:
        if self.done_at_start < 0:
            self.done_at_start = self.done
        self.page = max(MIN_PAGE, min(self.page, self.max_page))

    @property
    def max_page(self) -> int:
        return max(MIN_PAGE, min(MAX_PAGE, self.budget // 2))

    def room(self) -> bool:
        """Whether the next page may be planned now (within the in-flight budget)."""
        return self.inflight == 0 or self.inflight + self.page <= self.budget

    def planned(self, records: int) -> None:
        self.inflight += records

    def committed(self, records: int, seconds: float) -> None:
        """A page of ``records`` took ``seconds`` from planning to commit: grow or
        shrink the next."""
        self.inflight = max(0, self.inflight - records)
        if seconds <= self.target_seconds:
            self.page = min(self.max_page, self.page + STEP)
        else:
            self.page = max(MIN_PAGE, self.page // 2)

    def rate(self) -> float:
        """Records per second so far (this run)."""
        elapsed = time.monotonic() - self.started
        return (self.done - self.done_at_start) / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        rate = self.rate()
        if self.total is None or rate <= 0:
            return None
        return max(0.0, (self.total - self.done) / rate)
