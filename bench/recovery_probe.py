"""``python -m vectorsync`` with timestamps: the same CLI, its startup phases stamped.

python bench/recovery_probe.py run -v --log-format json   # = python -m vectorsync run ...

Used by bench_recovery.py to split a restart's time into its phases. Each stamp is one
JSON line ``{"step": NAME, "at": "begin"|"end", "t": time.time()}`` appended to the file
named by ``VECTORSYNC_PROBE_OUT``; the first, ``python``, is taken before anything of
vectorsync is imported. Nothing else changes: the wrappers only call through.
"""

from __future__ import annotations

import time

STARTED = time.time()

import functools  # noqa: E402
import os  # noqa: E402
from typing import Any  # noqa: E402

_OUT = os.open(os.environ["VECTORSYNC_PROBE_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)


def stamp(step: str, at: str, t: float | None = None) -> None:
    line = f'{{"step": "{step}", "at": "{at}", "t": {time.time() if t is None else t!r}}}\n'
    os.write(_OUT, line.encode())


stamp("python", "end", STARTED)
stamp("imports", "begin")
import vectorsync.cli  # noqa: E402
from vectorsync import engine, worker  # noqa: E402
from vectorsync.state import store  # noqa: E402

stamp("imports", "end")


def _wrap(owner: Any, name: str, step: str | None = None) -> None:
    original = getattr(owner, name)
    step = step or name

    if hasattr(original, "__code__") and original.__code__.co_flags & 0x80:  # a coroutine

        @functools.wraps(original)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            stamp(step, "begin")
            try:
                return await original(*args, **kwargs)
            finally:
                stamp(step, "end")

        setattr(owner, name, timed_async)
        return

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        stamp(step, "begin")
        try:
            return original(*args, **kwargs)
        finally:
            stamp(step, "end")

    setattr(owner, name, timed)


# in the order `vectorsync run` passes them (cli._run → Engine.open → cli._sync → Engine.run)
_wrap(vectorsync.cli, "load_config")
_wrap(engine, "preflight")
_wrap(engine, "build_source")  # imports the source's adapter module
_wrap(engine, "build_sink")  # imports qdrant-edge
_wrap(engine, "build_embedder")
_wrap(engine.Engine, "_validate")  # after the sources opened: read their schemas
_wrap(store.StateStore, "open")  # migrations
_wrap(engine.Engine, "prepare")
_wrap(engine.Engine, "_open_sinks")  # qdrant-edge loads its shards
_wrap(engine.Engine, "_runtime")  # after the sources' setup (capture checked/installed)
_wrap(store.StateStore, "register_schema")  # then the sink opens the collection
_wrap(engine.Engine, "targets")  # the sources' head (PostgreSQL: a fence through the stream)
_wrap(engine.Engine, "recover")  # dead runs marked failed, retention
_wrap(store.StateStore, "start_run")
_wrap(engine.Engine, "_take_leases")
_wrap(store.StateStore, "redo_inflight")
_wrap(worker.SourceWorker, "_pipeline")

vectorsync.cli.main()
