"""Sink outages of mappings with several sinks: one sink that is down does not hold the
others back.

A mapping with ``sinks = [a, b, c]`` runs as one target per sink in the same pipeline.
When a target's writes keep failing for ``outage_after`` seconds, the target is *down*:
its share of every batch is not written but its keys go to its backlog (a state-store
table, in the batch's commit), and the other targets' writes and positions go on. A
*probe* — a page of backlog keys re-read from the source, planned against the target's
committed state — is tried at growing intervals; the first one written brings the target
back, and pages go on until its backlog is empty. A probe is planned only when none of
the target's batches is in flight, so the state it compares with is what the sink holds.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from .config import MappingConfig

__all__ = ["Outages", "isolated"]

_FIRST_PROBE = 1.0  # seconds after a sink went down
_MAX_PROBE = 30.0


def isolated(mappings: Iterable[MappingConfig]) -> set[str]:
    """The mappings one sink outage must not hold back: the copies of a mapping that
    writes several sinks (``sinks = [...]``; not the copies ``embedder_by`` makes, which
    share one sink and stop and go together)."""
    configs = list(mappings)
    sinks: dict[str, set[str]] = {}
    for m in configs:
        sinks.setdefault(m.family, set()).add(m.sink)
    return {m.name for m in configs if len(sinks[m.family]) > 1}


@dataclass(slots=True)
class _Down:
    since: float
    probe_at: float
    interval: float


@dataclass(slots=True)
class Outages:
    outage_after: float = 5.0
    isolated: set[str] = field(default_factory=set)  # targets of several-sink mappings
    behind: set[str] = field(default_factory=set)  # targets with a backlog
    in_flight: dict[str, int] = field(default_factory=dict)  # target → its batches in flight
    probing: set[str] = field(default_factory=set)  # targets with a probe in flight
    given_up: set[str] = field(default_factory=set)  # `run --once`: probed and still down
    _down: dict[str, _Down] = field(default_factory=dict)

    def is_down(self, target: str) -> bool:
        return target in self._down

    def down_for(self, target: str) -> float | None:
        """Seconds the target has been down, None when it is up."""
        down = self._down.get(target)
        return None if down is None else time.monotonic() - down.since

    def failed(self, target: str) -> None:
        """Its write failed past ``outage_after`` (or a probe failed): down, next probe later."""
        now = time.monotonic()
        down = self._down.get(target)
        if down is None:
            self._down[target] = _Down(
                since=now, probe_at=now + _FIRST_PROBE, interval=_FIRST_PROBE
            )
        else:
            down.interval = min(_MAX_PROBE, down.interval * 2)
            down.probe_at = now + down.interval
        self.behind.add(target)

    def recovered(self, target: str) -> None:
        self._down.pop(target, None)

    def probe_due(self, target: str, *, once: bool) -> bool:
        """Whether a page of ``target``'s backlog may be planned now."""
        if target not in self.behind or target in self.probing or self.in_flight.get(target):
            return False
        down = self._down.get(target)
        if down is None:
            return True
        if once and target in self.given_up:
            return False
        return time.monotonic() >= down.probe_at

    def pending(self, *, once: bool) -> bool:
        """Whether some target still has a backlog to catch up in this run (``once``: one
        probe per target that is down, then the run ends with the backlog kept)."""
        return any(t not in self.given_up or not once for t in self.behind)
