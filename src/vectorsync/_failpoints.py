"""Named crash points for crash-safety tests.

``VECTORSYNC_FAILPOINT=after_sink_write:3`` kills the process with SIGKILL the third time
the worker passes ``after_sink_write``, after writing ``vectorsync: failpoint
after_sink_write fired`` to stderr so that a test can tell where it died. Unset (always,
in production) the check is one string comparison.
"""

from __future__ import annotations

import os
import signal
from typing import Literal, get_args

# Every point the batch cycle passes; a crash test kills at each of them.
Cycle = Literal[
    "after_redo_inflight",
    "after_read_changes",
    "after_embed",
    "after_journal",
    "after_sink_call",
    "after_sink_write",
    "after_state_commit",
    "after_source_ack",
]
POINTS: tuple[Cycle, ...] = get_args(Cycle)
# Points of optional paths, killed at by their own tests (a mapping's write_back, the
# write API between its journal, the source write and the sinks, scale-out's capture
# between publishing to the bus and acknowledging the source, a full check's folding
# process after folding a page of source rows).
Optional = Literal[
    "after_write_back",
    "writer_after_journal",
    "writer_after_source",
    "capture_after_publish",
    "check_fold_page",
]
OPTIONAL: tuple[Optional, ...] = get_args(Optional)
Failpoint = Cycle | Optional


def parse(spec: str) -> tuple[str, int]:
    """``name[:N]`` → (name, N); a typo must not silently turn a crash test into a no-op."""
    name, _, count = spec.partition(":")
    if name not in (*POINTS, *OPTIONAL):
        raise ValueError(
            f"VECTORSYNC_FAILPOINT={spec!r}: unknown failpoint {name!r} "
            f"(known: {', '.join((*POINTS, *OPTIONAL))})"
        )
    if not (count or "1").isdigit() or int(count or 1) < 1:
        raise ValueError(f"VECTORSYNC_FAILPOINT={spec!r}: the count after ':' must be 1 or more")
    return name, int(count or 1)


_spec = os.environ.get("VECTORSYNC_FAILPOINT", "")
_name, _remaining = parse(_spec) if _spec else ("", 0)


def hit(name: Failpoint) -> None:
    global _remaining
    if name != _name:
        return
    _remaining -= 1
    if _remaining == 0:
        os.write(2, f"vectorsync: failpoint {name} fired\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)
