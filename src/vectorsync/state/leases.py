"""Leases: one active holder per named role (today: the runner that applies a source's
changes), elected through the state store so it holds for every sink kind and every host.

A holder renews its lease with its heartbeat; a lease whose holder stopped renewing
expires and may be taken over. A holder that died on this host is taken over at once
(its process is gone). Every takeover increments the lease's *token*; a batch commit
carries the token it was started under and is refused when the lease moved on, so a
runner that lost its lease (paused, partitioned) can never write positions or record
state over its successor's.

Plain functions over one SQLAlchemy connection, run in a transaction by
:class:`~vectorsync.state.store.StateStore`.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from functools import cache
from typing import Any

from sqlalchemy import Connection, delete, select, text, update

from ..errors import PermanentError
from . import schema as s

__all__ = ["Lease", "LeaseHeld", "LeaseLost", "acquire", "fence", "release", "renew"]


class LeaseHeld(PermanentError):
    """Another live process holds the lease."""


class LeaseLost(PermanentError):
    """The lease was taken over: this holder must stop writing."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Lease:
    name: str
    holder: str
    token: int
    host: str
    pid: int
    process: str
    run_id: int | None
    expires_at: float


@cache
def _start_time(pid: int) -> str:
    """A process's start time (clock ticks since boot) from /proc: with the pid, it names
    one process even after the pid is reused. Empty where /proc is not there."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_tag(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{_start_time(pid)}"


def pid_alive(pid: int) -> bool:
    """Whether a process of this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


def _alive(tag: str) -> bool:
    pid_text, _, started = tag.partition(":")
    pid = int(pid_text)
    if not pid_alive(pid):
        return False
    if not started:
        return True
    _start_time.cache_clear()
    return _start_time(pid) == started


def _row(conn: Connection, name: str) -> Lease | None:
    t = s.leases
    r = conn.execute(select(t).where(t.c.name == name)).first()
    return None if r is None else _lease(r)


def _lease(r: Any) -> Lease:
    return Lease(
        name=r.name,
        holder=r.holder,
        token=int(r.token),
        host=r.host,
        pid=int(r.pid),
        process=r.process,
        run_id=r.run_id,
        expires_at=float(r.expires_at),
    )


def acquire(
    conn: Connection, name: str, holder: str, *, ttl: float, run_id: int | None = None
) -> int:
    """Take the lease (free, expired, ours, or held by a dead process on this host) and
    return its token; LeaseHeld naming the holder otherwise."""
    t = s.leases
    now, host = time.time(), socket.gethostname()
    values = {
        "holder": holder,
        "host": host,
        "pid": os.getpid(),
        "process": process_tag(),
        "run_id": run_id,
        "acquired_at": now,
        "expires_at": now + ttl,
    }
    if conn.dialect.name == "postgresql":  # one acquirer at a time, row or no row yet
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:n))"), {"n": f"lease:{name}"})
    lease = _row(conn, name)
    if lease is None:
        conn.execute(t.insert().values(name=name, token=1, **values))
        return 1
    takeover = (
        lease.holder == holder
        or lease.expires_at < now
        or (lease.host == host and not _alive(lease.process))
    )
    if not takeover:
        raise LeaseHeld(
            f"{_what(name)} is being synced by another vectorsync process (pid {lease.pid} on "
            f"{lease.host}{_run(lease.run_id)}, lease valid for {lease.expires_at - now:.0f}s "
            "more); stop it first: one runner per source. If that process died on another "
            "host, start again once its lease has expired: this one then takes it over"
        )
    token = lease.token + (lease.holder != holder)
    conn.execute(update(t).where(t.c.name == name).values(token=token, **values))
    return token


def renew(conn: Connection, name: str, holder: str, token: int, *, ttl: float) -> None:
    """Extend the lease; LeaseLost if it was taken over meanwhile."""
    t = s.leases
    done = conn.execute(
        update(t)
        .where(t.c.name == name, t.c.holder == holder, t.c.token == token)
        .values(expires_at=time.time() + ttl)
    )
    if done.rowcount != 1:
        raise _lost(conn, name)


def fence(conn: Connection, name: str, holder: str, token: int) -> None:
    """Inside a batch commit: go on only while the lease is still ours. The UPDATE locks
    the lease row, so a takeover waits for this commit to end (or this waits for it)."""
    t = s.leases
    done = conn.execute(
        update(t)
        .where(t.c.name == name, t.c.holder == holder, t.c.token == token)
        .values(holder=holder)
    )
    if done.rowcount != 1:
        raise _lost(conn, name)


def release(conn: Connection, name: str, holder: str) -> None:
    t = s.leases
    conn.execute(delete(t).where(t.c.name == name, t.c.holder == holder))


def holders(conn: Connection) -> list[Lease]:
    return [_lease(r) for r in conn.execute(select(s.leases))]


def _lost(conn: Connection, name: str) -> LeaseLost:
    now = _row(conn, name)
    who = "nobody" if now is None else f"pid {now.pid} on {now.host}{_run(now.run_id)}"
    return LeaseLost(
        f"{_what(name)}: this process lost its lease to {who} (it stopped renewing it for "
        "too long); it stops writing so the two never interleave"
    )


def _what(name: str) -> str:
    kind, _, value = name.partition(":")
    return f"{kind} {value!r}" if value else name


def _run(run_id: int | None) -> str:
    return "" if run_id is None else f", run {run_id}"
