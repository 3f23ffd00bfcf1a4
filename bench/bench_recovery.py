"""Recovery after kill -9 under load; figures go to bench/results/recovery-<kind>.json.

python bench/bench_recovery.py all      # sqlite, then pg-logical (on its own PostgreSQL 15)
python bench/bench_recovery.py sqlite --trials 10 --rate 300 --records 10000

The question (issue, seed 003): how long from restarting `vectorsync run` after a kill -9
under load until the first new change is applied? (Seed 003: under 5 minutes; aim: 5 s.)

Set-up, per source kind: a `docs` table of --records rows synced once, the hash embedder,
the qdrant-edge sink, the state store in SQLite (SQLite source: the app's database in WAL
mode, default poll interval 0.2 s; PostgreSQL: logical capture, poll interval 0.05 s). A
writer thread then commits --rate changes/s for the whole benchmark (transactions every
10 ms; a third inserts of new keys, a third text edits, a third metadata-only edits).

First, the steady state: a streaming runner, five marker rows, commit → applied.
Then each trial:

1. `vectorsync run` streams with VECTORSYNC_FAILPOINT=after_sink_write:N (N drawn from
   4..12): it SIGKILLs itself mid-batch, after the sink writes and before the state
   commit, so the restart finds a journal of in-flight writes to redo and the source's
   lease still held by the dead pid (its TTL not expired);
2. at once `python -m vectorsync run -v --log-format json` is spawned again (every other
   trial through bench/recovery_probe.py: the same CLI with its startup phases stamped)
   and one marker row with a new key is committed;
3. the marker counts as applied when its record state is committed in the state store
   (which follows the acknowledged sink write), polled every 5 ms;
4. the runner is stopped with SIGTERM (a clean stop) and the next trial begins.

Figures (seconds, min/median/max over the trials): restart_to_marker_s (spawn → marker
applied: the recovery time), marker_commit_to_applied_s, and phases_s: where the time
from the spawn goes (probed trials; consecutive, they add up to the total): interpreter
start, imports, config, building adapters (lazy adapter imports), opening the sources,
validating mappings, opening the state store, opening sinks (qdrant-edge: its folder
lock), source setup (capture checked), schema registration, opening the collection
(qdrant-edge: its import and loading the shard), the sources' head, recovery of dead
runs, run start + lease takeover, redo of the in-flight journal, then the batches (catching up
the backlog) until the marker's is committed. Also: the changes the restarted
run applied up to the marker's batch (the backlog and the marker), the records redone,
and the lease: TTL left at the kill and whether the restart took it over at once.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.pgserver import pg_server

from bench_pg import _project
from bench_sync import ROOT, _fresh, _insert, _write
from vectorsync.sources.pg_logical import parse_lsn

RUN = [sys.executable, "-m", "vectorsync", "run", "-v", "--log-format", "json"]
PROBED = [sys.executable, str(ROOT / "recovery_probe.py"), *RUN[3:]]
MARKERS = 1_000_000_000  # marker keys: far from the writer's
DEADLINE = 120.0
POLL = 0.005

# probe stamps that end each phase, in order; (step, "begin"|"end")
PHASES = [
    ("interpreter", ("python", "end")),
    ("imports", ("imports", "end")),
    ("config", ("load_config", "end")),
    ("build_adapters", ("build_embedder", "end")),
    ("open_sources", ("_validate", "begin")),
    ("validate_mappings", ("_validate", "end")),
    ("open_state_store", ("open", "end")),
    ("open_sinks", ("_open_sinks", "end")),
    ("source_setup", ("_runtime", "begin")),
    ("register_schema", ("register_schema", "end")),
    ("open_collection", ("prepare", "end")),
    ("source_head", ("targets", "end")),
    ("recover_dead_runs", ("recover", "end")),
    ("run_start_and_lease", ("_take_leases", "end")),
    ("redo_inflight", ("redo_inflight", "end")),
]


@dataclass
class Kind:
    name: str
    folder: Path
    connect: Callable[[], Any]  # a DB-API connection to the source, not autocommit
    ph: str  # the driver's placeholder

    @property
    def state_db(self) -> Path:
        return self.folder / ".vectorsync" / "state.db"

    def sql(self, statement: str) -> str:
        return statement.replace("?", self.ph)


class Writer(threading.Thread):
    """``rate`` changes/s in transactions every 10 ms: inserts, text edits, metadata edits."""

    def __init__(self, kind: Kind, records: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.kind, self.records, self.rate = kind, records, rate
        self.stop = threading.Event()
        self.done = 0
        self.seconds = 0.0

    def run(self) -> None:
        k = self.kind
        insert = k.sql("INSERT INTO docs VALUES (?, ?, ?, 'ann', 'a', 2020)")
        text = k.sql("UPDATE docs SET body = body || ' +' WHERE id = ?")
        meta = k.sql("UPDATE docs SET published = published + 1 WHERE id = ?")
        per_txn = max(1, round(self.rate / 100))
        rng = random.Random(11)
        new_key = self.records
        conn = k.connect()
        started = tick = time.monotonic()
        try:
            while not self.stop.is_set():
                for i in range(per_txn):
                    op = (self.done + i) % 3
                    if op == 0:
                        new_key += 1
                        conn.execute(insert, (new_key, f"title {new_key}", f"body {new_key}"))
                    else:
                        conn.execute(text if op == 1 else meta, (rng.randint(1, self.records),))
                conn.commit()
                self.done += per_txn
                tick += 0.01
                delay = tick - time.monotonic()
                if delay > 0:
                    self.stop.wait(delay)
        finally:
            self.seconds = time.monotonic() - started
            conn.close()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "VECTORSYNC_FAILPOINT"}
    return {**env, **extra}


def _spread(values: list[float], digits: int = 3) -> dict[str, float]:
    return {
        "min": round(min(values), digits),
        "median": round(statistics.median(values), digits),
        "max": round(max(values), digits),
    }


def _log_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for raw in path.read_text(errors="replace").splitlines():
        if raw.startswith("{"):
            line = json.loads(raw)
            line["t"] = (
                datetime.strptime(line["ts"], "%Y-%m-%dT%H:%M:%S.%fZ")
                .replace(tzinfo=UTC)
                .timestamp()
            )
            lines.append(line)
    return lines


def _stamps(path: Path) -> dict[tuple[str, str], float]:
    """The first time each (step, begin|end) was stamped."""
    first: dict[tuple[str, str], float] = {}
    for raw in path.read_text().splitlines():
        s = json.loads(raw)
        first.setdefault((s["step"], s["at"]), s["t"])
    return first


def _lease(state: sqlite3.Connection) -> dict[str, Any]:
    row = state.execute("SELECT token, pid, expires_at FROM leases WHERE name = 'source:app'")
    token, pid, expires_at = row.fetchone()
    return {"token": token, "pid": pid, "expires_at": expires_at}


def _applied(state: sqlite3.Connection, key: int) -> bool:
    row = state.execute(
        "SELECT 1 FROM record_state WHERE mapping = 'docs' AND key = ?", (str(key),)
    ).fetchone()
    return row is not None


def _marker(kind: Kind, conn: Any, key: int) -> tuple[float, int]:
    """Commit a marker row: when, and the lowest position its change can have (SQLite: its
    outbox row's; PostgreSQL: the WAL insert position before its commit record)."""
    conn.execute(
        kind.sql("INSERT INTO docs VALUES (?, 'marker', 'the marker row', 'ann', 'a', 2020)"),
        (key,),
    )
    if kind.ph == "?":
        (position,) = conn.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = '_vectorsync_outbox'"
        ).fetchone()
    else:
        (lsn,) = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        position = parse_lsn(lsn) + 1
    conn.commit()
    return time.time(), int(position)


def _wait_applied(state: sqlite3.Connection, key: int, proc: subprocess.Popen[bytes]) -> float:
    deadline = time.monotonic() + DEADLINE
    while not _applied(state, key):
        if proc.poll() is not None:
            raise RuntimeError(f"the runner exited ({proc.returncode}) before key {key} applied")
        if time.monotonic() > deadline:
            raise RuntimeError(f"key {key} not applied within {DEADLINE:g}s")
        time.sleep(POLL)
    return time.time()


@contextlib.contextmanager
def _streaming(kind: Kind, log: Path, cmd: list[str], env: dict[str, str]) -> Iterator[Any]:
    with log.open("wb") as err:
        proc = subprocess.Popen(
            cmd, cwd=kind.folder, env=env, stdout=subprocess.DEVNULL, stderr=err
        )
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _steady(kind: Kind, state: sqlite3.Connection, marker_conn: Any, n: int) -> list[float]:
    """Commit → applied of marker rows while one runner streams under the writer's load."""
    latencies = []
    with _streaming(kind, kind.folder / "steady.log", RUN, _env()) as proc:
        time.sleep(3)  # past startup and the catch-up since the initial sync
        for i in range(n):
            key = MARKERS - 1 - i
            committed, _ = _marker(kind, marker_conn, key)
            latencies.append(_wait_applied(state, key, proc) - committed)
            time.sleep(0.5)
    return latencies


def _trial(
    kind: Kind, trial: int, state: sqlite3.Connection, marker_conn: Any, rng: random.Random
) -> dict[str, Any]:
    folder = kind.folder
    passes = rng.randint(4, 12)
    crash_log = folder / f"crash-{trial}.log"
    with crash_log.open("wb") as err:
        crash = subprocess.Popen(
            RUN[:-3],  # no logs: only the failpoint's line
            cwd=folder,
            env=_env(VECTORSYNC_FAILPOINT=f"after_sink_write:{passes}"),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        code = crash.wait(timeout=DEADLINE)
    killed = time.time()
    assert code == -signal.SIGKILL, crash_log.read_text()
    assert "failpoint after_sink_write fired" in crash_log.read_text()
    dead = _lease(state)
    inflight = state.execute("SELECT COUNT(*) FROM inflight").fetchone()[0]

    probed = trial % 2 == 1
    probe_out = folder / f"probe-{trial}.jsonl"
    probe_out.unlink(missing_ok=True)
    env = _env(VECTORSYNC_PROBE_OUT=str(probe_out)) if probed else _env()
    log = folder / f"restart-{trial}.log"
    key = MARKERS + trial
    spawned = time.time()
    with _streaming(kind, log, PROBED if probed else RUN, env) as proc:
        committed, position = _marker(kind, marker_conn, key)
        applied = _wait_applied(state, key, proc)
        lease = _lease(state)
        pid = proc.pid
    lines = _log_lines(log)
    commits = [line for line in lines if line.get("action") == "batch_commit"]
    # the batches up to the marker's (the first at or past its position)
    before = list(itertools.takewhile(lambda line: line["position"] < position, commits))
    until = commits[: len(before) + 1]
    redo = [line for line in lines if line.get("action") == "redo_inflight"]
    result: dict[str, Any] = {
        "trial": trial,
        "probed": probed,
        "killed_at_pass": passes,
        "kill_to_spawn_s": spawned - killed,
        "restart_to_marker_s": applied - spawned,
        "marker_commit_to_applied_s": applied - committed,
        "spawn_to_marker_commit_s": committed - spawned,
        "inflight_batches_at_kill": inflight,
        "records_redone": sum(line.get("count", 0) for line in redo),
        "batches_until_marker": len(until),
        "changes_until_marker": sum(line.get("changes", 0) for line in until),
        "lease_ttl_left_at_kill_s": dead["expires_at"] - killed,
        "lease_taken_over": lease["pid"] == pid and lease["token"] == dead["token"] + 1,
        "retries": [line["message"] for line in lines if line.get("action") == "retry"],
        "warnings": sorted(
            {line["action"] for line in lines if line["level"] in ("warning", "error")}
        ),
    }
    if probed:
        stamps = _stamps(probe_out)
        phases, last = {}, spawned
        for name, stamp in PHASES:
            phases[name] = stamps[stamp] - last
            last = stamps[stamp]
        # read the backlog and the marker, embed, write, commit: up to the marker's batch
        # (the commit stamp itself can trail the poll, the runner's loop being busy)
        phases["batches_until_marker"] = applied - last
        result["phases_s"] = phases
        result["lease_acquire_s"] = stamps[("_take_leases", "end")] - stamps[("start_run", "end")]
    return result


def bench(kind: Kind, records: int, rate: float, trials: int) -> None:
    done = subprocess.run(
        [*RUN[:-3], "--once"], cwd=kind.folder, env=_env(), capture_output=True, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    state = sqlite3.connect(f"file:{kind.state_db}?mode=ro", uri=True, isolation_level=None)
    marker_conn = kind.connect()
    writer = Writer(kind, records, rate)
    writer.start()
    rng = random.Random(20260301)
    try:
        steady = _steady(kind, state, marker_conn, 5)
        results = []
        for trial in range(trials):
            results.append(_trial(kind, trial, state, marker_conn, rng))
            r = results[-1]
            print(
                f"{kind.name} trial {trial}: restart → marker {r['restart_to_marker_s']:.3f}s "
                f"(commit → applied {r['marker_commit_to_applied_s']:.3f}s), "
                f"{r['changes_until_marker']} changes applied until the marker, "
                f"{r['records_redone']} redone",
                file=sys.stderr,
            )
    finally:
        writer.stop.set()
        writer.join()
        marker_conn.close()
    probed = [r for r in results if r["probed"]]
    figures: dict[str, Any] = {
        "source": kind.name,
        "sink": "qdrant-edge",
        "embedder": "hash",
        "records": records,
        "mix": "a third inserts, a third text edits, a third metadata-only edits",
        "writer_target_changes_per_s": rate,
        "writer_achieved_changes_per_s": round(writer.done / writer.seconds, 1),
        "kill": "SIGKILL at failpoint after_sink_write (sink written, state not committed), "
        "on its 4th to 12th pass while streaming under the writer's load",
        "trials": len(results),
        "probed_trials": len(probed),
        "goal_s": 5,
        "seed_003_goal_s": 300,
        "steady_state_commit_to_applied_s": _spread(steady),
    }
    for name in (
        "restart_to_marker_s",
        "marker_commit_to_applied_s",
        "kill_to_spawn_s",
        "changes_until_marker",
        "batches_until_marker",
        "records_redone",
        "lease_ttl_left_at_kill_s",
    ):
        figures[name] = _spread([float(r[name]) for r in results])
    for label, subset in (("plain", [r for r in results if not r["probed"]]), ("probed", probed)):
        if subset:
            figures[f"restart_to_marker_s_{label}"] = _spread(
                [r["restart_to_marker_s"] for r in subset]
            )
    figures["lease_taken_over_at_once"] = all(r["lease_taken_over"] for r in results)
    if probed:
        figures["lease_acquire_s"] = _spread([r["lease_acquire_s"] for r in probed])
        figures["phases_s"] = {
            name: _spread([r["phases_s"][name] for r in probed]) for name in probed[0]["phases_s"]
        }
    figures["retries_at_restart"] = sum(len(r["retries"]) for r in results)
    figures["per_trial"] = [
        {
            k: round(v, 3) if isinstance(v, float) else v
            for k, v in r.items()
            if k not in ("phases_s",)
        }
        for r in results
    ]
    _write(f"recovery-{kind.name}", figures)


def bench_sqlite(records: int, rate: float, trials: int) -> None:
    folder = _fresh("recovery-sqlite", "hash")
    db = sqlite3.connect(folder / "app.db")
    db.execute("PRAGMA journal_mode = WAL")
    db.close()
    _insert(
        folder,
        [(i, f"title {i}", f"body of record {i}", "ann", "a", 2020) for i in range(1, records + 1)],
    )
    kind = Kind("sqlite", folder, lambda: sqlite3.connect(folder / "app.db", timeout=30), "?")
    bench(kind, records, rate, trials)


def bench_pg_logical(records: int, rate: float, trials: int) -> None:
    with pg_server() as server:
        folder, url = _project(server, "recovery", records)
        kind = Kind("pg-logical", folder, lambda: psycopg.connect(url), "%s")
        bench(kind, records, rate, trials)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("which", choices=["sqlite", "pg-logical", "all"])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=300)
    parser.add_argument("--trials", type=int, default=10)
    args = parser.parse_args()
    if args.which in ("sqlite", "all"):
        bench_sqlite(args.records, args.rate, args.trials)
    if args.which in ("pg-logical", "all"):
        bench_pg_logical(args.records, args.rate, args.trials)


if __name__ == "__main__":
    main()
