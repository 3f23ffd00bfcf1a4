"""Child processes (throwaway servers) stopped the same way everywhere."""

from __future__ import annotations

import subprocess
from typing import Any


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    """Terminate ``proc`` if it still runs, kill it if it outlives ``timeout``, and reap it."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
