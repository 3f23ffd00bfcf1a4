"""Named crash points for crash-safety tests.

``VECTORSYNC_FAILPOINT=after_sink_write:3`` kills the process with SIGKILL the third time
the worker passes ``after_sink_write``. Unset (always, in production) the check is one
dict lookup.
"""

from __future__ import annotations

import os
import signal

_spec = os.environ.get("VECTORSYNC_FAILPOINT", "")
_name, _, _count = _spec.partition(":")
_remaining = int(_count or 1)


def hit(name: str) -> None:
    global _remaining
    if not _spec or name != _name:
        return
    _remaining -= 1
    if _remaining <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
