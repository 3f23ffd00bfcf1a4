"""Sync runs, the error log, dead-letter operations, statistics and retention.

Plain functions over one SQLAlchemy connection; :class:`~vectorsync.state.store.StateStore`
runs each in a transaction on its lane and is the public API.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import Connection, and_, delete, func, or_, select, update

from ..model import dumps
from ..redact import redact, redact_value
from . import schema as s
from .leases import pid_alive

__all__ = [
    "ErrorEntry",
    "RunCounts",
    "SyncRun",
    "cleanup",
    "complete_run",
    "heartbeat",
    "log_error",
    "recover_runs",
    "start_run",
    "statistics",
]

_COUNT_FIELDS = (
    "processed",
    "inserted",
    "updated",
    "payload_only",
    "deleted",
    "embedded",
    "skipped",
    "failed",
)


def _json(value: Any) -> str:
    return dumps(value).decode()


@dataclass(slots=True, kw_only=True)
class RunCounts:
    processed: int = 0
    inserted: int = 0
    updated: int = 0
    payload_only: int = 0
    deleted: int = 0
    embedded: int = 0
    skipped: int = 0
    failed: int = 0
    bytes: int = 0
    tokens: int = 0  # billed by API embedders
    cost_micros: int = 0  # their cost, in millionths of the prices' currency

    def add(self, other: Mapping[str, int]) -> None:
        for name in (*_COUNT_FIELDS, "bytes", "tokens", "cost_micros"):
            setattr(self, name, getattr(self, name) + other.get(name, 0))

    def columns(self) -> dict[str, int | float | None]:
        values: dict[str, int | float | None] = {
            f"records_{n}": getattr(self, n) for n in _COUNT_FIELDS
        }
        cost = self.cost_micros / 1e6 if self.cost_micros else None
        return {**values, "bytes_processed": self.bytes, "tokens": self.tokens, "cost": cost}


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncRun:
    id: int
    mode: str
    status: str
    started_at: float
    completed_at: float | None
    heartbeat_at: float
    duration_ms: int | None
    counts: dict[str, int]
    config_hash: str
    instance_id: str
    host: str
    pid: int
    source_info: dict[str, Any]
    destination_info: dict[str, Any]
    error_message: str | None
    error_details: dict[str, Any] | None
    cost: float | None = None  # of the tokens API embedders billed (counts["tokens"])


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorEntry:
    error_type: str
    message: str
    error_code: str | None = None
    run_id: int | None = None
    mapping: str | None = None
    source: str | None = None
    key: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    stack_trace: str | None = None
    record_data: dict[str, Any] | None = None
    retry_count: int = 0
    max_retries: int | None = None
    status: str = "open"
    id: int | None = None
    created_at: float = 0.0
    updated_at: float = 0.0


def start_run(
    conn: Connection,
    *,
    mode: str,
    config_hash: str,
    instance_id: str,
    source_info: Mapping[str, Any],
    destination_info: Mapping[str, Any],
) -> int:
    now = time.time()
    result = conn.execute(
        s.sync_runs.insert().values(
            mode=mode,
            status="running",
            started_at=now,
            heartbeat_at=now,
            config_hash=config_hash,
            instance_id=instance_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            source_info=_json(source_info),
            destination_info=_json(destination_info),
            **RunCounts().columns(),
        )
    )
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def heartbeat(conn: Connection, run_id: int, counts: RunCounts) -> None:
    t = s.sync_runs
    conn.execute(
        update(t)
        .where(t.c.id == run_id, t.c.status == "running")
        .values(heartbeat_at=time.time(), **counts.columns())
    )


def complete_run(
    conn: Connection,
    run_id: int,
    *,
    status: str,
    counts: RunCounts,
    error_message: str | None = None,
    error_details: Mapping[str, Any] | None = None,
) -> None:
    t = s.sync_runs
    now = time.time()
    started = conn.scalar(select(t.c.started_at).where(t.c.id == run_id)) or now
    conn.execute(
        update(t)
        .where(t.c.id == run_id)
        .values(
            status=status,
            completed_at=now,
            heartbeat_at=now,
            duration_ms=int((now - started) * 1000),
            error_message=None if error_message is None else redact(error_message),
            error_details=None if error_details is None else _json(redact_value(error_details)),
            **counts.columns(),
        )
    )


def recover_runs(conn: Connection, *, stale_after: float) -> list[int]:
    """Mark runs whose process is gone as failed: on this host, a dead pid; elsewhere, no
    heartbeat for ``stale_after`` seconds. Dead letters stuck in 'processing' go back to
    'pending'. Returns the ids of the runs marked failed."""
    t = s.sync_runs
    now = time.time()
    host = socket.gethostname()
    dead: list[int] = []
    for run_id, run_host, pid, beat in conn.execute(
        select(t.c.id, t.c.host, t.c.pid, t.c.heartbeat_at).where(t.c.status == "running")
    ):
        gone = not pid_alive(pid) if run_host == host and pid != os.getpid() else False
        if gone or now - beat > stale_after:
            dead.append(int(run_id))
    for run_id in dead:
        conn.execute(
            update(t)
            .where(t.c.id == run_id)
            .values(
                status="failed",
                completed_at=now,
                duration_ms=(t.c.heartbeat_at - t.c.started_at) * 1000,
                error_message="the run's process died (no heartbeat); recovered",
            )
        )
    dl = s.dead_letter
    conn.execute(
        update(dl).where(dl.c.status == "processing").values(status="pending", updated_at=now)
    )
    return dead


def _run(row: Any) -> SyncRun:
    m = row._mapping
    return SyncRun(
        id=m["id"],
        mode=m["mode"],
        status=m["status"],
        started_at=m["started_at"],
        completed_at=m["completed_at"],
        heartbeat_at=m["heartbeat_at"],
        duration_ms=m["duration_ms"],
        counts={
            **{n: int(m[f"records_{n}"]) for n in _COUNT_FIELDS},
            "bytes": int(m["bytes_processed"]),
            "tokens": int(m["tokens"]),
        },
        cost=m["cost"],
        config_hash=m["config_hash"],
        instance_id=m["instance_id"],
        host=m["host"],
        pid=m["pid"],
        source_info=orjson.loads(m["source_info"]),
        destination_info=orjson.loads(m["destination_info"]),
        error_message=m["error_message"],
        error_details=orjson.loads(m["error_details"]) if m["error_details"] else None,
    )


def runs(conn: Connection, *, limit: int = 20, run_id: int | None = None) -> list[SyncRun]:
    t = s.sync_runs
    query = select(t).order_by(t.c.id.desc()).limit(limit)
    if run_id is not None:
        query = select(t).where(t.c.id == run_id)
    return [_run(r) for r in conn.execute(query)]


def log_error(conn: Connection, entry: ErrorEntry) -> int:
    now = time.time()
    result = conn.execute(
        s.error_log.insert().values(
            run_id=entry.run_id,
            mapping=entry.mapping,
            source=entry.source,
            key=entry.key,
            error_type=entry.error_type,
            error_code=entry.error_code,
            message=redact(entry.message),
            details=_json(redact_value(entry.details)),
            stack_trace=None if entry.stack_trace is None else redact(entry.stack_trace),
            record_data=None if entry.record_data is None else _json(entry.record_data),
            retry_count=entry.retry_count,
            max_retries=entry.max_retries,
            status=entry.status,
            created_at=now,
            updated_at=now,
        )
    )
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


_KEPT_MESSAGES = 20  # per incident: the first one and the latest others


def update_error(
    conn: Connection,
    error_id: int,
    *,
    retry_count: int | None = None,
    status: str | None = None,
    message: str | None = None,
) -> None:
    """Update an incident; a ``message`` becomes its latest message and joins the list of
    what each attempt reported (``details.messages``), so no failure of a retry incident is
    invisible (a 503 then a timeout, say)."""
    t = s.error_log
    now = time.time()
    values: dict[str, Any] = {"updated_at": now}
    if retry_count is not None:
        values["retry_count"] = retry_count
    if status is not None:
        values["status"] = status
    if message is not None:
        message = redact(message)
        raw = conn.scalar(select(t.c.details).where(t.c.id == error_id))
        details = orjson.loads(raw) if raw else {}
        seen = details.setdefault("messages", [])
        seen.append({"at": now, "attempt": retry_count, "message": message})
        if len(seen) > _KEPT_MESSAGES:
            del seen[1 : len(seen) - _KEPT_MESSAGES + 1]
        values.update(message=message, details=_json(details))
    conn.execute(update(t).where(t.c.id == error_id).values(**values))


def resolve_record_errors(conn: Connection, mapping: str, keys: Sequence[str]) -> None:
    t = s.error_log
    conn.execute(
        update(t)
        .where(t.c.mapping == mapping, t.c.key.in_(keys), t.c.status == "open")
        .values(status="resolved", updated_at=time.time())
    )


def _error(row: Any) -> ErrorEntry:
    m = dict(row._mapping)
    m["details"] = orjson.loads(m["details"])
    m["record_data"] = orjson.loads(m["record_data"]) if m["record_data"] else None
    return ErrorEntry(**m)


def errors(conn: Connection, *, status: str | None = None, limit: int = 100) -> list[ErrorEntry]:
    t = s.error_log
    query = select(t).order_by(t.c.id.desc()).limit(limit)
    if status is not None:
        query = query.where(t.c.status == status)
    return [_error(r) for r in conn.execute(query)]


def statistics(conn: Connection, *, hours: float | None) -> dict[str, Any]:
    """Figures over the last ``hours`` (all of the retained history when None)."""
    since = 0.0 if hours is None else time.time() - hours * 3600
    t, e, dl = s.sync_runs, s.error_log, s.dead_letter
    rows = conn.execute(
        select(
            t.c.status,
            func.count(),
            func.sum(t.c.duration_ms),
            func.sum(t.c.records_processed),
            func.avg(t.c.duration_ms),
        )
        .where(t.c.started_at >= since)
        .group_by(t.c.status)
    ).all()
    by_status = {r[0]: int(r[1]) for r in rows}
    finished = [r for r in rows if r[0] != "running"]
    total_ms = sum(int(r[2] or 0) for r in finished)
    processed = sum(int(r[3] or 0) for r in finished)
    done = sum(by_status.get(k, 0) for k in ("completed", "failed", "cancelled"))
    avg_ms = total_ms / done if done else None
    errors_by_type = {
        str(k): int(v)
        for k, v in conn.execute(
            select(e.c.error_type, func.count())
            .where(e.c.created_at >= since)
            .group_by(e.c.error_type)
        ).all()
    }
    dlq = {
        str(k): int(v)
        for k, v in conn.execute(select(dl.c.status, func.count()).group_by(dl.c.status)).all()
    }
    return {
        "hours": hours,
        "runs": {"total": sum(by_status.values()), **by_status},
        "success_rate": by_status.get("completed", 0) / done if done else None,
        "records_processed": processed,
        "throughput_per_s": processed / (total_ms / 1000) if total_ms else None,
        "average_run_seconds": None if avg_ms is None else avg_ms / 1000,
        "errors_by_type": errors_by_type,
        "dead_letters": dlq,
        "dead_letters_pending": int(dlq.get("pending", 0)),
    }


def cleanup(
    conn: Connection, *, retention_days: float, keep_schema_versions: int = 10
) -> dict[str, int]:
    """Delete history older than the retention window (never open errors, pending dead
    letters or running runs) and schema versions beyond the newest ``keep`` per mapping."""
    cutoff = time.time() - retention_days * 86400
    t, e, dl, sr = s.sync_runs, s.error_log, s.dead_letter, s.schema_registry
    removed = {
        "sync_runs": conn.execute(
            delete(t).where(t.c.started_at < cutoff, t.c.status != "running")
        ).rowcount,
        "error_log": conn.execute(
            delete(e).where(e.c.updated_at < cutoff, e.c.status != "open")
        ).rowcount,
        "dead_letter": conn.execute(
            delete(dl).where(
                dl.c.updated_at < cutoff, or_(dl.c.status == "resolved", dl.c.status == "discarded")
            )
        ).rowcount,
        "schema_registry": 0,
    }
    for mapping, newest in conn.execute(
        select(sr.c.mapping, func.max(sr.c.version)).group_by(sr.c.mapping)
    ).all():
        removed["schema_registry"] += conn.execute(
            delete(sr).where(
                and_(sr.c.mapping == mapping, sr.c.version <= newest - keep_schema_versions)
            )
        ).rowcount
    return {k: int(v) for k, v in removed.items()}
