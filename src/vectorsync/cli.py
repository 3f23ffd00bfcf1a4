"""The command line: parse, configure logging, open the engine, call one service."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, TypeVar

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

from .config import CONFIG_ENV, Config, load_config
from .engine import Engine, RunResult
from .errors import ConfigError, VectorsyncError
from .worker import BatchReport

__all__ = ["app", "main"]

T = TypeVar("T")

app = typer.Typer(
    name="vectorsync",
    help="Keep vector stores consistent with the database that owns the truth.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()

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

_verbose = False


def _setup_logging(verbose: bool) -> None:
    global _verbose
    _verbose = verbose
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _execute(work: Callable[[], Awaitable[T]]) -> T:
    """Run one service call; map errors to exit codes (2: config, 1: anything else)."""
    try:
        return asyncio.run(work())  # type: ignore[arg-type]
    except ConfigError as exc:
        err.print(f"[bold red]config error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    except (VectorsyncError, OSError) as exc:
        if _verbose:
            err.print_exception()
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        cause = exc.__cause__
        while cause is not None:
            err.print(f"  caused by: {type(cause).__name__}: {cause}", highlight=False)
            cause = cause.__cause__
        raise typer.Exit(1) from None


def _config(path: Path | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        err.print(f"[bold red]config error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None


@app.command()
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
    verbose: VerboseOption = False,
) -> None:
    """Sync continuously (or --once) from every source into every sink."""
    _setup_logging(verbose)
    cfg = _config(config)
    result = _execute(lambda: _run(cfg, once))
    err.print(_summary(result), highlight=False)


async def _run(cfg: Config, once: bool) -> RunResult:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Engine.open(cfg) as engine:
        await engine.prepare()
        targets = await engine.targets()
        start = sum(p for p, _ in targets.values())
        total = sum(max(0, h - p) for p, h in targets.values()) if once else None
        done: dict[str, int] = {name: p for name, (p, _) in targets.items()}
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
            task = progress.add_task("syncing" if once else "streaming", total=total, rate="")

            def on_batch(report: BatchReport) -> None:
                done[report.source] = report.position
                elapsed = progress.tasks[0].elapsed or 1e-9
                applied = sum(done.values()) - start
                progress.update(task, completed=applied, rate=f"{applied / elapsed:,.0f} changes/s")

            return await engine.run(once=once, stop=stop, on_batch=on_batch)


def _summary(result: RunResult) -> str:
    c = result.counts
    rate = result.changes / result.seconds if result.seconds else 0.0
    return (
        f"{result.changes} changes in {result.seconds:.1f}s ({rate:,.0f}/s): "
        f"{c.get('embedded', 0)} embedded, {c.get('cache_hits', 0)} from cache, "
        f"{c.get('upserted', 0)} upserted, {c.get('payload_only', 0)} payload-only, "
        f"{c.get('deleted', 0)} deleted, {c.get('skipped', 0)} unchanged, "
        f"{c.get('failed', 0)} dead-lettered"
    )


@app.command()
def setup(config: ConfigOption = None, verbose: VerboseOption = False) -> None:
    """Validate the config, install change capture and create collections (idempotent)."""
    _setup_logging(verbose)
    cfg = _config(config)

    async def work() -> None:
        async with Engine.open(cfg) as engine:
            await engine.prepare()

    _execute(work)
    err.print("capture installed; collections ready")


@app.command()
def status(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Per mapping: applied position, lag, record and dead-letter counts."""
    _setup_logging(verbose)
    cfg = _config(config)

    async def work() -> list[dict[str, Any]]:
        async with Engine.open(cfg) as engine:
            return [asdict(s) for s in await engine.status()]

    rows = _execute(work)
    if as_json:
        out.print_json(json.dumps({"mappings": rows}))
        return
    table = Table(
        "mapping",
        "source → sink",
        "position",
        "lag",
        "lag (s)",
        "records",
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
            str(r["records"]),
            str(r["dead_letters"]),
            str(c.get("embedded", 0)),
            str(c.get("payload_only", 0)),
            str(c.get("deleted", 0)),
        )
    out.print(table)


@app.command()
def search(
    mapping: Annotated[str, typer.Argument(help="mapping to search")],
    query: Annotated[str, typer.Argument(help="text to search for")],
    limit: Annotated[int, typer.Option("--limit", "-n")] = 5,
    config: ConfigOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Semantic search in a mapping's collection."""
    _setup_logging(verbose)
    cfg = _config(config)

    async def work() -> list[Any]:
        async with Engine.open(cfg) as engine:
            return await engine.search(mapping, query, limit)

    for hit in _execute(work):
        out.print(f"{hit.score:.3f}  {json.dumps(hit.record.payload, default=str)}")


@app.command()
def demo(
    directory: Annotated[
        Path, typer.Option("--dir", help="where the demo's files go (recreated)")
    ] = Path("vectorsync-demo"),
    records: Annotated[int, typer.Option(help="how many stdlib symbols to load at most")] = 3000,
    embedder: Annotated[
        str, typer.Option(help="sentence-transformers or hash")
    ] = "sentence-transformers",
    verbose: VerboseOption = False,
) -> None:
    """The main job on embedded defaults: the Python standard library's docs in SQLite,
    synced into qdrant-edge with the bundled MiniLM model, then live changes and a search."""
    from .demo import run_demo

    _setup_logging(verbose)
    _execute(lambda: run_demo(directory, records=records, embedder=embedder, console=out))


def main() -> None:
    app()
