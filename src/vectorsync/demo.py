"""``vectorsync demo``: the main job on embedded defaults, end to end.

A knowledge base nobody here wrote — the Python standard library's modules, classes and
functions with their docstrings, read with ``inspect`` — goes into SQLite, syncs into
qdrant-edge with the bundled MiniLM model, then takes live changes (text edits,
metadata-only edits, deletes, inserts) while the engine streams, and ends with a search.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import shutil
import sqlite3
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .config import load_config
from .engine import Engine
from .worker import BatchReport

__all__ = ["run_demo", "stdlib_symbols"]

MODULES = [
    "abc",
    "argparse",
    "array",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "bz2",
    "calendar",
    "cmath",
    "collections",
    "collections.abc",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "filecmp",
    "fnmatch",
    "fractions",
    "functools",
    "getpass",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "html.parser",
    "http.client",
    "http.server",
    "imaplib",
    "importlib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "keyword",
    "linecache",
    "locale",
    "logging",
    "lzma",
    "mailbox",
    "math",
    "mimetypes",
    "multiprocessing",
    "numbers",
    "operator",
    "optparse",
    "os",
    "os.path",
    "pathlib",
    "pickle",
    "pkgutil",
    "platform",
    "plistlib",
    "poplib",
    "pprint",
    "queue",
    "quopri",
    "random",
    "re",
    "reprlib",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "signal",
    "smtplib",
    "socket",
    "socketserver",
    "sqlite3",
    "ssl",
    "stat",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "timeit",
    "tokenize",
    "traceback",
    "types",
    "typing",
    "unicodedata",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "weakref",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "zipfile",
    "zlib",
    "zoneinfo",
]

DDL = """CREATE TABLE symbols (
    id TEXT PRIMARY KEY,      -- qualified name, e.g. json.loads
    kind TEXT NOT NULL,       -- module | class | function | method
    module TEXT NOT NULL,
    name TEXT NOT NULL,
    signature TEXT,
    doc TEXT,
    summary TEXT,
    stability TEXT NOT NULL DEFAULT 'stable',
    doc_lines INTEGER
)"""

CONFIG = """\
[state]
url = "sqlite:///.vectorsync/state.db"

[sources.app]
kind = "sqlite"
path = "app.db"

[sinks.vectors]
kind = "qdrant-edge"
path = ".vectorsync/qdrant"

[embedders.default]
kind = "{embedder}"

[[mappings]]
name = "stdlib"
source = "app"
table = "symbols"
key = "id"
text = "{{{{ id }}}}{{{{ signature or '' }}}} ({{{{ kind }}}})\\n{{{{ (doc or '')[:600] }}}}"
payload = ["kind", "module", "name", "summary", "stability"]
sink = "vectors"
embedder = "default"
"""

QUERIES = (
    "parse a JSON document into Python objects",
    "run a shell command and capture its output",
    "compress data into a gzip file",
    "wait for several asynchronous tasks to finish",
)


def stdlib_symbols(limit: int) -> Iterator[dict[str, Any]]:
    """Modules, classes, functions and methods of the standard library, with docstrings."""
    seen: set[str] = set()
    count = 0
    for module_name in MODULES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
        for row in _module_rows(module_name, module):
            if row["id"] in seen or not row["doc"]:
                continue
            seen.add(row["id"])
            yield row
            count += 1
            if count >= limit:
                return


def _module_rows(module_name: str, module: Any) -> Iterator[dict[str, Any]]:
    yield _row(module_name, "module", module_name, module_name.rsplit(".", 1)[-1], module)
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
            continue
        if inspect.isclass(obj):
            yield _row(f"{module_name}.{name}", "class", module_name, name, obj)
            for meth_name, meth in sorted(vars(obj).items()):
                if not meth_name.startswith("_") and inspect.isfunction(meth):
                    yield _row(
                        f"{module_name}.{name}.{meth_name}", "method", module_name, meth_name, meth
                    )
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            yield _row(f"{module_name}.{name}", "function", module_name, name, obj)


def _row(qualname: str, kind: str, module: str, name: str, obj: Any) -> dict[str, Any]:
    doc = inspect.getdoc(obj) or ""
    signature = None
    if kind in ("function", "method"):
        with contextlib.suppress(TypeError, ValueError):
            signature = str(inspect.signature(obj))
    return {
        "id": qualname,
        "kind": kind,
        "module": module,
        "name": name,
        "signature": signature,
        "doc": doc,
        "summary": doc.split("\n", 1)[0][:200],
        "doc_lines": doc.count("\n") + 1,
    }


def _insert(db: sqlite3.Connection, rows: list[dict[str, Any]]) -> None:
    db.executemany(
        "INSERT INTO symbols (id, kind, module, name, signature, doc, summary, doc_lines) "
        "VALUES (:id, :kind, :module, :name, :signature, :doc, :summary, :doc_lines)",
        rows,
    )


async def run_demo(directory: Path, *, records: int, embedder: str, console: Console) -> None:
    started = time.monotonic()
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    console.rule("[bold]vectorsync demo")
    rows = list(stdlib_symbols(records + 5))
    held_back, rows = rows[-5:], rows[:-5]
    db = sqlite3.connect(directory / "app.db")
    db.execute(DDL)
    _insert(db, rows)
    db.commit()
    kinds: dict[str, int] = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    plural = {"class": "classes"}
    counted = ", ".join(f"{n} {plural.get(k, k + 's')}" for k, n in sorted(kinds.items()))
    console.print(
        f"1. Loaded {len(rows)} standard-library symbols into SQLite ({counted}): "
        f"{directory / 'app.db'}"
    )
    (directory / "vectorsync.toml").write_text(CONFIG.format(embedder=embedder))
    config = load_config(directory / "vectorsync.toml")

    async with Engine.open(config) as engine:
        console.print("2. Loading the embedding model and installing change capture …")
        await engine.prepare()
        await _initial_sync(engine, len(rows), console)
        await _live_changes(engine, db, held_back, console)
        console.print("5. Semantic search over the synced collection (qdrant-edge):")
        for query in QUERIES:
            table = Table(title=f"“{query}”", title_justify="left", show_edge=False)
            for col in ("score", "id", "kind", "summary"):
                table.add_column(col, overflow="fold")
            for hit in await engine.search("stdlib", query, limit=3):
                p = hit.record.payload
                table.add_row(
                    f"{hit.score:.3f}", str(p["_vs_key"]), str(p["kind"]), str(p["summary"])[:90]
                )
            console.print(table)
    db.close()
    command = shutil.which("vectorsync") or str(Path(sys.executable).parent / "vectorsync")
    toml = directory / "vectorsync.toml"
    console.print(f"Done in {time.monotonic() - started:.0f}s. Try:", highlight=False)
    console.print(f"  {command} status -c {toml}", highlight=False, markup=False)
    console.print(
        f'  {command} search stdlib "read a JSON file" -c {toml}', highlight=False, markup=False
    )


async def _initial_sync(engine: Engine, total: int, console: Console) -> None:
    with Progress(
        TextColumn("   initial sync"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("sync", total=total, rate="")

        def on_batch(report: BatchReport) -> None:
            elapsed = progress.tasks[0].elapsed or 1e-9
            done = progress.tasks[0].completed + report.changes
            progress.update(task, completed=done, rate=f"{done / elapsed:,.0f} records/s")

        result = await engine.run(once=True, on_batch=on_batch)
    c = result.counts
    console.print(
        f"3. Synced {result.changes} records in {result.seconds:.1f}s: "
        f"{c.get('embedded', 0)} embedded, {c.get('upserted', 0)} points written"
    )


async def _live_changes(
    engine: Engine, db: sqlite3.Connection, held_back: list[dict[str, Any]], console: Console
) -> None:
    totals: dict[str, int] = {}

    def on_batch(report: BatchReport) -> None:
        for k, n in report.counts.items():
            totals[k] = totals.get(k, 0) + n

    stop = asyncio.Event()
    streaming = asyncio.create_task(engine.run(stop=stop, on_batch=on_batch))
    edited = [
        r[0]
        for r in db.execute("SELECT id FROM symbols WHERE kind = 'function' ORDER BY id LIMIT 10")
    ]
    db.executemany(
        "UPDATE symbols SET doc = ? || doc WHERE id = ?",
        [("Reviewed for the vectorsync demo. ", k) for k in edited],
    )
    db.execute(
        "UPDATE symbols SET stability = 'deprecated' WHERE module IN ('optparse', 'imaplib')"
    )
    meta = db.execute("SELECT changes()").fetchone()[0]
    gone = [
        r[0]
        for r in db.execute("SELECT id FROM symbols WHERE kind = 'method' ORDER BY id DESC LIMIT 5")
    ]
    db.executemany("DELETE FROM symbols WHERE id = ?", [(k,) for k in gone])
    _insert(db, held_back)
    db.commit()
    console.print(
        f"4. Live changes committed while the engine streams: {len(edited)} text "
        f"edits, {meta} metadata-only edits, {len(gone)} deletes, "
        f"{len(held_back)} inserts"
    )
    await _caught_up(engine, deadline=120.0)
    stop.set()
    await streaming
    console.print(
        f"   applied: {totals.get('embedded', 0)} texts embedded (only the {len(edited)} edited "
        f"+ {len(held_back)} new), {totals.get('payload_only', 0)} payload-only updates "
        f"(no embedding), {totals.get('deleted', 0)} points deleted, "
        f"{totals.get('skipped', 0)} unchanged"
    )


async def _caught_up(engine: Engine, deadline: float) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        targets = await engine.targets()
        if all(applied >= head for applied, head in targets.values()):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the engine did not catch up within {deadline:.0f}s")
