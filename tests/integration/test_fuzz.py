"""Fuzz: random rows of random types (NULL, NaN/inf, huge numbers, bytes, invalid UTF-8,
nested JSON, 10 MB text, odd keys) at SQLite and PostgreSQL sources, into qdrant-edge and
qdrant-client sinks. Whatever the rows hold, the run completes; every row ends up as a
point or as a pending dead letter with a reason; no point outlives its row; and a good row
written after the odd ones always syncs.

Each sync is also checked by the engine's own full consistency check (no drift right after
a sync) and, in-process, followed by a replay of the dead letters and a second sync that
must keep every guarantee. One database, state store and sink serve every example of a
test: each example replaces the previous rows (some keys recur, some change), so deletes,
updates, payload-only updates, key changes, TRUNCATE and stale points are exercised too.

The defects this fuzz found have minimal reproductions at the end of the file; they are
fixed, and the strategies include their triggers. A defect still open is reproduced there
marked xfail(strict=True), and its trigger left out of the strategies (saying where) so
that the fuzz keeps looking for new ones."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from vectorsync.check import CATEGORIES, CheckReport
from vectorsync.config import Config, load_config
from vectorsync.embed.hash import HashEmbedder
from vectorsync.engine import Engine
from vectorsync.errors import RecordError
from vectorsync.model import Key, SinkRecord, content_hash, decode_text, point_id
from vectorsync.render import Rendered
from vectorsync.sinks.base import CollectionSpec, Sink
from vectorsync.sinks.qdrant_edge import QdrantEdgeSink
from vectorsync.state.store import DeadLetter, StateStore
from vectorsync.worker import MappingRuntime

SINKS = {
    "qdrant-edge": 'kind = "qdrant-edge"\npath = ".vectorsync/qdrant"',
    "qdrant-memory": 'kind = "qdrant"\npath = ":memory:"',
}


class HugeText(str):
    """A text that a failing example's report shows by its size."""

    def __repr__(self) -> str:
        return f"<{len(self)} characters>"


HUGE_TEXT = HugeText("lorem ipsum dolor sit amet " * (10 * 1024 * 1024 // 27))  # about 10 MB


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,  # the same examples on every run (CI is repeatable)
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],  # no slow "explain" phase
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,  # the database is reused on purpose
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


# -- values ------------------------------------------------------------------------------
class CastText(bytes):
    """Bytes written to SQLite as ``CAST(? AS TEXT)``: TEXT that may not be valid UTF-8."""


NO_NUL = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")  # PG refuses NUL
ODD_TEXT = [
    "",
    " ",
    "\n\t",
    "None",
    "null",
    "b'\\xff'",
    "\x1f",
    "a\x00b",
    "{{ title }}",
    "{% raw %}",
    "ünïcødé ✓ 🚀 \u202e",
    "1e400",
    "NaN",
    "-0",
    "9223372036854775808",
    '[1, {"a": null}]',
]
ODD_KEYS = ODD_TEXT  # "None" too: see test_null_key_dead_letter_survives_a_text_key_none


def json_texts() -> st.SearchStrategy[str]:
    """JSON documents: nested lists and objects (odd keys too) of JSON values, numbers of
    any size (jsonb reads any integral number back as an exact integer)."""
    values = st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(NO_NUL, max_size=8),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(NO_NUL, max_size=5), inner)
        ),
        max_leaves=12,
    )
    odd = ['{"": {"": [[]]}}', "{}", '{"a.b": {"[0]": -0.0}}', "-1e-400", '"\\u00e9"']
    return values.map(json.dumps) | st.sampled_from(odd)


# Numbers no 64-bit integer or finite double holds (see test_huge_number_is_dead_lettered
# and test_numeric_infinity_is_dead_lettered)
HUGE_JSON_NUMBERS = ['{"big": 1e400}', "123456789012345678901234567890", "[1.8e19]", "-1e19"]
huge_int_text = (
    st.integers(min_value=2**63, max_value=2**200) | st.integers(max_value=-(2**63) - 1)
).map(str)


def sqlite_values(odd_texts: list[str]) -> st.SearchStrategy[Any]:
    """Any value SQLite stores, in any column (declared types only suggest)."""
    return st.one_of(
        st.none(),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.sampled_from([-(2**63), 2**63 - 1, 0, -1]),
        st.floats(),  # NaN (SQLite keeps NULL), ±inf, -0.0, subnormals
        st.text(max_size=30),
        st.sampled_from(odd_texts),
        json_texts() | st.sampled_from(HUGE_JSON_NUMBERS),  # SQLite: just TEXT
        huge_int_text,  # an INTEGER column keeps it as REAL, an untyped one as TEXT
        st.binary(max_size=30),
        st.binary(min_size=1, max_size=12).map(CastText),
    )


SQLITE_ANY = sqlite_values(ODD_TEXT)
pg_text = st.text(NO_NUL, max_size=30) | st.sampled_from([t for t in ODD_TEXT if "\x00" not in t])
pg_values: dict[str, st.SearchStrategy[Any]] = {
    "title": pg_text,
    "body": pg_text,
    "doc": json_texts() | st.sampled_from(HUGE_JSON_NUMBERS),
    "x": st.floats() | st.sampled_from([float("nan"), float("inf"), float("-inf"), 5e-324]),
    "num": st.decimals(allow_nan=True, allow_infinity=True)
    | st.integers().map(Decimal)
    | st.sampled_from(
        [Decimal(t) for t in ("-1e-400", "1e-20", "NaN", "0.1", "Infinity", "-Infinity", "1e30")]
    ),
    "n": st.integers(min_value=-(2**63), max_value=2**63 - 1),
    "raw": st.binary(max_size=30),
}

# -- tables ------------------------------------------------------------------------------
SQLITE_DDL = {
    "ipk": "CREATE TABLE ipk (id INTEGER PRIMARY KEY, title TEXT, body, misc, n INTEGER, "
    "x REAL, tag TEXT)",
    # SQLite lets a non-INTEGER primary key hold NULL (several), blobs and invalid UTF-8
    "tpk": "CREATE TABLE tpk (id TEXT PRIMARY KEY, title TEXT, body, misc, n INTEGER, "
    "x REAL, tag TEXT)",
    # INT affinity but not a rowid alias: text, reals and blobs fit in the key
    "bpk": "CREATE TABLE bpk (id BIGINT PRIMARY KEY, title TEXT, body, misc, n INTEGER, "
    "x REAL, tag TEXT)",
}
SQLITE_MAPPINGS = {
    "ipk": {"text": "{{ title }}\n{{ body }}", "payload": ["n", "x", "tag", "misc", "body"]},
    "tpk": {
        "text": "{{ title }} {% if misc %}[{{ misc }}]{% endif %} {{ body }}",
        "payload": ["n", "x", "tag", "misc"],
        "max_text_length": 5000,
        "long_text": "dead_letter",
    },
    "bpk": {"text": "{{ body }} {{ misc }} {{ n }} {{ x }}", "payload": ["n", "x", "tag"]},
}
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
SMALL_INT = st.integers(min_value=-5, max_value=40)  # keys recur: updates, not just inserts
# a few texts recur, so some updates change the payload only
PLAIN_TEXT = st.sampled_from(["alpha", "beta gamma"]) | st.text(max_size=30)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
# (plain keys, odd keys): rows mostly have plain keys, so most of them can sync
SQLITE_KEYS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "ipk": (SMALL_INT, INT64 | st.sampled_from([-(2**63), 2**63 - 1, 0])),
    "tpk": (
        st.text(min_size=1, max_size=20),
        st.one_of(
            st.none(),
            st.sampled_from(ODD_KEYS),
            st.integers(min_value=995, max_value=1005).map(lambda n: "k" * n),  # ~1000 chars
            st.binary(max_size=12),
            st.binary(min_size=1, max_size=8).map(CastText),
            INT64,
            st.floats(),
        ),
    ),
    # -2**63 too: see test_a_real_key_equal_to_an_integer_leaves_no_point
    "bpk": (SMALL_INT, sqlite_values(ODD_KEYS)),
}
SQLITE_PLAIN: dict[str, st.SearchStrategy[Any]] = {
    "title": PLAIN_TEXT,
    "body": st.sampled_from(["one", "two three"]) | st.text(min_size=1, max_size=60),
    "misc": st.none() | PLAIN_TEXT | INT64 | FINITE,
    "n": st.none() | INT64,
    "x": st.none() | FINITE,
    "tag": st.none() | PLAIN_TEXT,
}
PG_DDL = (
    "CREATE TABLE {t} (id {key} PRIMARY KEY, title text, body text, doc jsonb, "
    "x double precision, num numeric, n bigint, raw bytea)"
)
PG_KEYS: dict[str, tuple[str, st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "pint": ("bigint", SMALL_INT, INT64 | st.sampled_from([-(2**63), 2**63 - 1, 0])),
    "ptext": (
        "text",
        st.text(NO_NUL, min_size=1, max_size=20),
        st.sampled_from([t for t in ODD_TEXT if "\x00" not in t])
        | st.integers(min_value=995, max_value=1005).map(lambda n: "k" * n),
    ),
}
PG_PLAIN: dict[str, st.SearchStrategy[Any]] = {
    "title": st.text(NO_NUL, max_size=30),
    "body": st.text(NO_NUL, min_size=1, max_size=60),
    "doc": st.none() | st.just('{"a": [1, 2.5, "x", null, {"b": true}]}') | st.just("[]"),
    "x": st.none() | FINITE,
    "num": st.none() | st.decimals(min_value=-(10**12), max_value=10**12, places=3),
    "n": st.none() | INT64,
    "raw": st.none() | st.binary(max_size=20),
}
PG_MAPPING = {
    "text": "{{ title }}\n{{ body }} {{ raw }} {{ x }}",
    "payload": ["doc", "x", "num", "n", "title"],
}


def _rows(
    keys: tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]],
    plain: dict[str, st.SearchStrategy[Any]],
    odd: Callable[[str], st.SearchStrategy[Any]],
) -> st.SearchStrategy[list[dict[str, Any]]]:
    """Rows of plain values, up to two columns replaced by odd values (and now and then
    an odd key)."""
    plain_key, odd_key = keys
    odd_columns = st.lists(st.sampled_from(list(plain)), max_size=2, unique=True).flatmap(
        lambda columns: st.fixed_dictionaries({c: odd(c) for c in columns})
    )
    row = st.builds(
        lambda key, base, extra: {"id": key, **base, **extra},
        plain_key | plain_key | odd_key,
        st.fixed_dictionaries(plain),
        odd_columns,
    )
    return st.lists(row, max_size=6)


sqlite_cases = st.fixed_dictionaries(
    {t: _rows(SQLITE_KEYS[t], SQLITE_PLAIN, lambda _c: SQLITE_ANY) for t in SQLITE_DDL}
)
pg_cases = st.fixed_dictionaries(
    {
        t: _rows((plain, odd), PG_PLAIN, pg_values.__getitem__)
        for t, (_, plain, odd) in PG_KEYS.items()
    },
    optional={"truncate": st.booleans()},
)
Case = dict[str, Any]  # table → rows (and, PostgreSQL, "truncate")
Moves = dict[str, list[tuple[int, Any]]]  # table → (row index, new key)


def _moves(keys: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Key changes after the rows are written: (row index, new key) per table."""
    return st.fixed_dictionaries(
        {t: st.lists(st.tuples(st.integers(0, 5), k), max_size=2) for t, k in keys.items()}
    )


sqlite_moves = _moves({t: plain | odd for t, (plain, odd) in SQLITE_KEYS.items()})
pg_moves = _moves({t: plain | odd for t, (_, plain, odd) in PG_KEYS.items()})
NO_MOVES: dict[str, list[Any]] = {}


def _huge_sqlite_case() -> dict[str, list[dict[str, Any]]]:
    """A 10 MB text in every table (and in one mapping's payload)."""
    row = {"title": "huge", "body": HUGE_TEXT, "misc": None, "n": 1, "x": 0.5, "tag": "big"}
    return {
        "ipk": [{"id": 1, **row}],
        "tpk": [{"id": "huge", **row}],
        "bpk": [{"id": 1, **row, "misc": HUGE_TEXT}],
    }


def _each_odd_sqlite_case() -> Case:
    """One row of each odd kind, so every run covers them whatever the draws."""
    plain = {"title": "t", "body": "b", "misc": None, "n": 1, "x": 0.5, "tag": "a"}
    odd: list[dict[str, Any]] = [
        {"x": float("inf")},
        {"x": float("nan")},
        {"n": "9" * 30},  # an INTEGER column keeps it as REAL
        {"n": 2**63 - 1, "x": -0.0},
        {"misc": b"\x00\xff"},
        {"misc": CastText(b"\xff\xfe")},
        {"misc": '{"a": [1, {"b": null}], "": 1e400}'},
        {"tag": 42},
        {"title": "", "body": None},
        {"body": "x" * 6000},
    ]
    keys: list[Any] = [None, "None", b"\x01", CastText(b"\xff"), "k" * 1001, "", "a\x00b", 1.5]
    return {
        "ipk": [{"id": i, **plain, **o} for i, o in enumerate(odd)],
        "tpk": [{"id": k, **plain} for k in keys]
        + [{"id": f"o{i}", **plain, **o} for i, o in enumerate(odd)],
        "bpk": [{"id": k, **plain} for k in [*keys, -(2**63)]] + [{"id": "9" * 25, **plain}],
    }


def _real_key_sqlite_case() -> Case:
    """After _each_odd_sqlite_case: the integer key -2**63 gives way to the REAL key
    -2.0**63, equal to it (see test_a_real_key_equal_to_an_integer_leaves_no_point)."""
    row = {"title": "t", "body": "b", "misc": None, "n": 1, "x": 0.5, "tag": "a"}
    return {"ipk": [], "tpk": [], "bpk": [{"id": -(2.0**63), **row}, {"id": 3, **row}]}


def _each_odd_pg_case() -> Case:
    plain = {"title": "t", "body": "b", "doc": None, "x": 0.5, "num": Decimal(1), "n": 1}
    odd: list[dict[str, Any]] = [
        {"x": float("nan")},
        {"x": float("-inf")},
        {"num": Decimal("NaN")},
        {"num": Decimal("1e-400")},
        {"num": Decimal("Infinity")},
        {"num": Decimal("-1e30")},
        {"doc": '{"big": 1e400}'},
        {"doc": "123456789012345678901234567890"},
        {"doc": '{"a": [1, {"b": null}], "": {"": []}, "a.b": -0.0}'},
        {"raw": b"\x00\xff"},
        {"title": "", "body": ""},
        {"body": "x" * 30_000},
    ]
    return {
        "pint": [{"id": i, **plain, **o} for i, o in enumerate(odd)],
        "ptext": [{"id": k, **plain} for k in ("", " ", "None", "k" * 1001, "\x1f\n'\"\\")]
        + [{"id": f"o{i}", **plain, **o} for i, o in enumerate(odd)],
        "truncate": True,
    }


def _huge_pg_case() -> dict[str, list[dict[str, Any]]]:
    row = {"title": "huge", "body": HUGE_TEXT, "doc": None, "x": None, "num": None}
    return {"pint": [{"id": 1, **row, "n": 1, "raw": None}], "ptext": [{"id": "huge", **row}]}


# -- config --------------------------------------------------------------------------------
def _mapping_toml(name: str, spec: dict[str, Any]) -> str:
    lines = [
        "[[mappings]]",
        f'name = "{name}"',
        'source = "app"',
        f'table = "{name}"',
        'key = "id"',
        'sink = "vectors"',
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in spec.items()]  # JSON strings are TOML
    return "\n".join(lines)


def write_fuzz_config(folder: Path, source: str, sink: str, mappings: dict[str, Any]) -> Path:
    parts = [
        '[state]\nurl = "sqlite:///.vectorsync/state.db"',
        f"[sources.app]\n{source}",
        f"[sinks.vectors]\n{sink}",
        "[sync]\nbatch_size = 5",  # several batches per run
        '[embedders.default]\nkind = "hash"',
        *(_mapping_toml(name, spec) for name, spec in mappings.items()),
    ]
    path = folder / "vectorsync.toml"
    path.write_text("\n\n".join(parts) + "\n")
    return path


# -- the source databases ------------------------------------------------------------------
class SqliteDb:
    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.text_factory = decode_text  # read keys back as the engine does
        for ddl in SQLITE_DDL.values():
            self.db.execute(ddl)

    def close(self) -> None:
        self.db.close()

    def write(self, case: Case, moves: Moves, good: dict[str, dict[str, Any]]) -> None:
        """Replace every table's rows by the case's (what the database refuses is skipped),
        change some keys, then write the good row."""
        for table in SQLITE_DDL:
            self.db.execute(f"DELETE FROM {table}")
            for row in case[table]:
                with contextlib.suppress(sqlite3.IntegrityError, sqlite3.ProgrammingError):
                    self._insert(table, row, "INSERT")
            rowids = [r[0] for r in self.db.execute(f"SELECT rowid FROM {table} ORDER BY rowid")]
            for i, key in moves.get(table, []) if rowids else []:
                mark = "CAST(? AS TEXT)" if isinstance(key, CastText) else "?"
                value = bytes(key) if isinstance(key, CastText) else key
                with contextlib.suppress(sqlite3.IntegrityError):
                    self.db.execute(
                        f"UPDATE {table} SET id = {mark} WHERE rowid = ?",
                        (value, rowids[i % len(rowids)]),
                    )
            self._insert(table, good[table], "INSERT OR REPLACE")

    def _insert(self, table: str, row: dict[str, Any], verb: str) -> None:
        columns = list(row)
        marks = ", ".join(
            "CAST(? AS TEXT)" if isinstance(row[c], CastText) else "?" for c in columns
        )
        params = [bytes(v) if isinstance(v, CastText) else v for v in row.values()]
        self.db.execute(f"{verb} INTO {table} ({', '.join(columns)}) VALUES ({marks})", params)

    def keys(self, table: str) -> list[Any]:
        return [r[0] for r in self.db.execute(f"SELECT id FROM {table}")]


class PgDb:
    def __init__(self, url: str) -> None:
        self.pg = psycopg.connect(url, autocommit=True)
        for table, (key_type, *_) in PG_KEYS.items():
            self.pg.execute(PG_DDL.format(t=table, key=key_type))  # type: ignore[arg-type]

    def close(self) -> None:
        self.pg.close()

    def write(self, case: Case, moves: Moves, good: dict[str, dict[str, Any]]) -> None:
        """Replace every table's rows by the case's (TRUNCATE when it says so; what the
        database refuses is skipped), change some keys, then write the good row."""
        for table in PG_KEYS:
            empty = "TRUNCATE" if case.get("truncate") else "DELETE FROM"
            self.pg.execute(f"{empty} {table}")  # type: ignore[arg-type]
            for row in case[table]:
                with contextlib.suppress(psycopg.DataError, psycopg.IntegrityError):
                    self._insert(table, row)
            for i, key in moves.get(table, []):
                with contextlib.suppress(psycopg.DataError, psycopg.IntegrityError):
                    self.pg.execute(
                        f"UPDATE {table} SET id = %s WHERE id = "  # type: ignore[arg-type]
                        f"(SELECT id FROM {table} ORDER BY id OFFSET %s LIMIT 1)",
                        (key, i),
                    )
            self.pg.execute(f"DELETE FROM {table} WHERE id = %s", (good[table]["id"],))  # type: ignore[arg-type]
            self._insert(table, good[table])

    def _insert(self, table: str, row: dict[str, Any]) -> None:
        columns = list(row)
        marks = ", ".join("%s::jsonb" if c == "doc" else "%s" for c in columns)
        self.pg.execute(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",  # type: ignore[arg-type]
            list(row.values()),
        )

    def keys(self, table: str) -> list[Any]:
        return [r[0] for r in self.pg.execute(f"SELECT id FROM {table}")]  # type: ignore[arg-type]


# -- running and observing -----------------------------------------------------------------
@dataclass
class Seen:
    """One mapping after a sync: its points, its pending dead letters written since the
    example started, and (in-process) its rendered rows, for the rows that have a point."""

    points: dict[str, SinkRecord]
    letters: list[DeadLetter]
    rendered: dict[Key, Rendered] = field(default_factory=dict)
    report: CheckReport | None = None  # `vectorsync check` (full) right after the sync
    ulp_floats: bool = False  # the sink may return payload floats 1 ULP off (qdrant-edge)


async def observe(sink: Sink, state: StateStore, config: Config, since: float) -> dict[str, Seen]:
    seen: dict[str, Seen] = {}
    for m in config.mappings:
        points = {r.id: r async for r in sink.scroll(m.collection_name)}
        letters = [
            d for d in await state.dead_letters(m.name, status=None) if d.updated_at >= since
        ]
        seen[m.name] = Seen(points=points, letters=letters)
    return seen


class InProcess:
    """``Engine.run(once=True)`` on one engine kept open for every example (a
    qdrant-client ``:memory:`` sink lives only as long as its engine)."""

    def __init__(self, config_path: Path) -> None:
        self.config = load_config(config_path)
        self.loop = asyncio.new_event_loop()
        self.stack = contextlib.AsyncExitStack()
        self.engine = self.loop.run_until_complete(
            self.stack.enter_async_context(Engine.open(self.config))
        )

    def sync(self, since: float) -> dict[str, Seen]:
        return self.loop.run_until_complete(self._sync(since))

    async def _sync(self, since: float) -> dict[str, Seen]:
        result = await self.engine.run(once=True)
        assert result.run_id is not None
        seen = await observe(self.engine.sinks["vectors"], self.engine.state, self.config, since)
        for runtime in await self.engine.prepare():
            await self._render(runtime, seen[runtime.name])
            seen[runtime.name].report = await self.engine.check(runtime.name)
            seen[runtime.name].ulp_floats = self.config.sinks["vectors"].kind == "qdrant-edge"
        return seen

    async def _render(self, runtime: MappingRuntime, seen: Seen) -> None:
        """The current rows that have a point, rendered as the engine renders them."""
        keys = [r.payload["_vs_key"] for r in seen.points.values()]
        source = self.engine.sources[runtime.config.source]
        rows = await source.fetch(runtime.config.table, runtime.config.key, keys)
        for key, row in rows.items():
            with contextlib.suppress(RecordError):  # then a dead letter explains the point
                seen.rendered[key] = runtime.renderer.render(row)

    def replay(self, letters: list[DeadLetter], since: float) -> dict[str, Seen]:
        """Replay dead letters (after ``vectorsync dlq replay``) and sync once more. Those of
        invalid keys are not replayed (no key to re-read by): they stay pending."""
        ids = [d.id for d in letters if d.id is not None]
        keyed = [d for d in letters if d.details.get("error_code") != "invalid_key"]
        count = self.loop.run_until_complete(self.engine.replay_dead_letters(ids))
        assert count == len(keyed), (count, len(ids), len(keyed))
        return self.sync(since)

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.stack.aclose())
        finally:
            self.loop.close()


class Cli:
    """``python -m vectorsync run --once`` as a subprocess: its exit code is checked (and
    that ``dlq list`` can show whatever was dead-lettered)."""

    def __init__(self, config_path: Path) -> None:
        self.config = load_config(config_path)
        self.folder = config_path.parent

    def _vectorsync(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "vectorsync", *args],
            cwd=self.folder,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, (args, done.stderr[-4000:])
        return done.stdout

    def sync(self, since: float) -> dict[str, Seen]:
        self._vectorsync("run", "--once")
        seen = asyncio.run(self._observe(since))
        listed = json.loads(self._vectorsync("dlq", "list", "--json"))["dead_letters"]
        pending = {d.id for s in seen.values() for d in s.letters if d.status == "pending"}
        assert pending <= {d["id"] for d in listed}
        return seen

    async def _observe(self, since: float) -> dict[str, Seen]:
        sink = QdrantEdgeSink("check", self.folder / ".vectorsync" / "qdrant")
        state = StateStore(self.config.state_url())
        await sink.open()
        await state.open()
        try:
            for m in self.config.mappings:  # an embedded sink opens collections by their spec
                spec = CollectionSpec(name=m.collection_name, dimension=384, distance="cosine")
                await sink.ensure_collection(spec)
            return await observe(sink, state, self.config, since)
        finally:
            await state.close()
            await sink.close()

    def close(self) -> None:
        pass


def _stored(key: Any) -> Any:
    """A key as a dead letter's details keep it (JSON, other types as text)."""
    return orjson.loads(orjson.dumps(key, default=str))


def _same(sink: Any, source: Any, ulp_floats: bool) -> bool:
    """Equal values; with ``ulp_floats``, floats a few ULP apart count as equal: qdrant-edge
    returns payload floats up to 1 ULP off (see test_check_tolerates_qdrant_edge_float_ulp)."""
    if isinstance(source, float) and isinstance(sink, float) and ulp_floats:
        return math.isclose(sink, source, rel_tol=4 * sys.float_info.epsilon, abs_tol=0.0)
    if isinstance(source, dict) and isinstance(sink, dict):
        return all(_same(sink.get(k), v, ulp_floats) for k, v in source.items())
    if isinstance(source, list) and isinstance(sink, list) and len(source) == len(sink):
        return all(_same(a, b, ulp_floats) for a, b in zip(sink, source, strict=True))
    return bool(sink == source)


def assert_accounted(table: str, keys: list[Any], good: tuple[Any, str, str], seen: Seen) -> None:
    """Every row is a point or a pending dead letter with a reason, written since the
    example started; no point without a row; a point of a row that renders holds what it
    renders to; the good row is a point with its current payload."""
    lettered: dict[bytes, DeadLetter] = {}
    for d in seen.letters:
        assert d.error_type and d.message.strip() and d.details.get("table") == table, d
        if d.status == "pending":
            lettered.setdefault(orjson.dumps(d.details.get("key")), d)
        else:  # resolved: the same key synced since (checked below, as a point)
            assert d.status == "resolved", f"{table}: dead letter {d.key!r} left {d.status}"
    ids = {
        point_id(table, k): k for k in keys if isinstance(k, int | str) and not isinstance(k, bool)
    }
    for key in keys:
        pid = point_id(table, key) if isinstance(key, int | str) else None
        if pid in seen.points:
            assert seen.points[pid].payload["_vs_key"] == key, (table, key)
            continue
        assert orjson.dumps(_stored(key)) in lettered, (
            f"{table}: row {key!r} is neither a point nor a pending dead letter "
            f"(dead letters: {sorted((d.key[:40], d.status) for d in seen.letters)})"
        )
    orphans = [seen.points[p].payload.get("_vs_key") for p in set(seen.points) - set(ids)]
    assert not orphans, f"{table}: points without a row: {orphans!r}"
    for key, rendered in seen.rendered.items():
        if orjson.dumps(_stored(key)) in lettered:
            continue  # the point is the last version that synced
        payload = seen.points[point_id(table, key)].payload
        assert payload["_vs_text_hash"] == content_hash(HashEmbedder().model_id, rendered.text)
        for name, value in rendered.payload.items():
            assert _same(payload.get(name), value, seen.ulp_floats), (
                f"{table}: row {key!r}: payload {name!r} is {payload.get(name)!r}, not {value!r}"
            )
    if seen.report is not None:  # the engine's own check agrees
        drift = [
            (d.category, d.key)
            for d in seen.report.drift
            if d.category in CATEGORIES  # dead-lettered records are known, not drift
        ]
        assert not drift, f"{table}: check finds drift right after a sync: {drift!r}"
    good_key, name, value = good
    point = seen.points.get(point_id(table, good_key))
    assert point is not None, f"{table}: the good row {good_key!r} was not synced"
    assert point.payload[name] == value, f"{table}: the good row's point is stale"


def exercise(
    db: SqliteDb | PgDb,
    runner: InProcess | Cli,
    case: Case,
    moves: Moves,
    good: dict[str, dict[str, Any]],
    field_name: str,
) -> None:
    """Write the rows and a good row per table, sync once, check; in-process, then replay
    the pending dead letters and check again."""
    since = time.time()
    db.write(case, moves, good)
    seen = runner.sync(since)
    for table, row in good.items():
        assert_accounted(
            table, db.keys(table), (row["id"], field_name, row[field_name]), seen[table]
        )
    if isinstance(runner, InProcess):
        letters = [d for s in seen.values() for d in s.letters if d.status == "pending"]
        seen = runner.replay(letters, since)
        for table, row in good.items():
            good_one = (row["id"], field_name, row[field_name])
            assert_accounted(table, db.keys(table), good_one, seen[table])


# -- the tests -----------------------------------------------------------------------------
_example_numbers = iter(range(1, 1_000_000))
GOOD_KEY = 4_000_000_001  # outside the plain keys' range


def _good_rows(tables: Any, text_key: str, **row: Any) -> dict[str, dict[str, Any]]:
    return {t: {"id": text_key if t in ("tpk", "ptext") else GOOD_KEY, **row} for t in tables}


@pytest.fixture
def sqlite_runner(
    workdir: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[SqliteDb, InProcess | Cli]]:
    sink, how = request.param
    db = SqliteDb(workdir / "app.db")
    source = 'kind = "sqlite"\npath = "app.db"\npoll_interval = 0.05'
    path = write_fuzz_config(workdir, source, SINKS[sink], SQLITE_MAPPINGS)
    runner: InProcess | Cli = InProcess(path) if how == "engine" else Cli(path)
    try:
        yield db, runner
    finally:
        runner.close()
        db.close()


def _sqlite_example(db: SqliteDb, runner: InProcess | Cli, case: Case, moves: Moves) -> None:
    n = next(_example_numbers)
    good = _good_rows(
        SQLITE_DDL, "good", title="good row", body=f"a good body {n}", n=7, x=1.5, tag=f"good-{n}"
    )
    exercise(db, runner, case, moves, good, "tag")


@pytest.mark.parametrize(
    "sqlite_runner",
    [("qdrant-edge", "engine"), ("qdrant-memory", "engine")],
    indirect=True,
    ids=["qdrant-edge", "qdrant-memory"],
)
@fuzz_settings(40)
@example(case=_huge_sqlite_case(), moves=NO_MOVES)
@example(case=_each_odd_sqlite_case(), moves={"bpk": [(0, -1), (3, "moved")]})
@example(case=_real_key_sqlite_case(), moves=NO_MOVES)
@given(case=sqlite_cases, moves=sqlite_moves)
def test_sqlite_odd_rows(
    sqlite_runner: tuple[SqliteDb, InProcess | Cli], case: Case, moves: Moves
) -> None:
    _sqlite_example(*sqlite_runner, case, moves)


@pytest.mark.parametrize(
    "sqlite_runner", [("qdrant-edge", "cli")], indirect=True, ids=["qdrant-edge-cli"]
)
@fuzz_settings(8)
@example(case=_huge_sqlite_case(), moves=NO_MOVES)
@given(case=sqlite_cases, moves=sqlite_moves)
def test_sqlite_odd_rows_cli_exits_zero(
    sqlite_runner: tuple[SqliteDb, InProcess | Cli], case: Case, moves: Moves
) -> None:
    _sqlite_example(*sqlite_runner, case, moves)


@pytest.fixture
def pg_runner(
    workdir: Path, pg_url: str, request: pytest.FixtureRequest
) -> Iterator[tuple[PgDb, InProcess]]:
    capture, sink = request.param
    db = PgDb(pg_url)
    source = f'kind = "postgres"\nurl = "{pg_url}"\ncapture = "{capture}"\npoll_interval = 0.2'
    path = write_fuzz_config(workdir, source, SINKS[sink], dict.fromkeys(PG_KEYS, PG_MAPPING))
    runner = InProcess(path)
    try:
        yield db, runner
    finally:
        runner.close()
        db.close()


PG_COMBINATIONS = [
    (capture, sink)
    for capture in ("logical", "outbox")
    for sink in ("qdrant-edge", "qdrant-memory")
]


@pytest.mark.parametrize(
    "pg_runner", PG_COMBINATIONS, indirect=True, ids=[f"{c}-{s}" for c, s in PG_COMBINATIONS]
)
@fuzz_settings(30)
@example(case=_huge_pg_case(), moves=NO_MOVES)
@example(case=_each_odd_pg_case(), moves={"ptext": [(0, "moved")]})
@given(case=pg_cases, moves=pg_moves)
def test_postgres_odd_rows(pg_runner: tuple[PgDb, InProcess], case: Case, moves: Moves) -> None:
    n = next(_example_numbers)
    good = _good_rows(PG_KEYS, "good", title=f"good-{n}", body=f"a good body {n}", n=7)
    exercise(*pg_runner, case, moves, good, "title")


# -- defects this fuzz found (fixed; each reproduction guards its fix) ----------------------
@pytest.fixture
def tiny(workdir: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Any, InProcess]]:
    """One table ``t`` (``request.param``: source kind, DDL, sink) mapped with text
    ``{{ body }}`` and payload ``x``, and an engine kept open on it."""
    kind, ddl, sink = request.param
    db: Any
    if kind == "sqlite":
        db = sqlite3.connect(workdir / "app.db", isolation_level=None)
        source = 'kind = "sqlite"\npath = "app.db"'
    else:
        url = request.getfixturevalue("pg_url")
        db = psycopg.connect(url, autocommit=True)
        source = f'kind = "postgres"\nurl = "{url}"\ncapture = "{kind}"'
    db.execute(ddl)
    spec = {"text": "{{ body }}", "payload": ["x"]}
    runner = InProcess(write_fuzz_config(workdir, source, SINKS[sink], {"t": spec}))
    try:
        yield db, runner
    finally:
        runner.close()
        db.close()


PG_T = "CREATE TABLE t (id bigint PRIMARY KEY, body text, x {})"


# A PostgreSQL numeric Infinity (or NaN) is a float, dead-lettered as a payload value; it used
# to raise OverflowError out of sources/postgres.py plain() and stall the source.
@pytest.mark.parametrize("tiny", [("outbox", PG_T.format("numeric"), "qdrant-edge")], indirect=True)
def test_numeric_infinity_is_dead_lettered(tiny: tuple[Any, InProcess]) -> None:
    db, runner = tiny
    db.execute("INSERT INTO t VALUES (1, 'odd', 'Infinity'), (2, 'good', 1)")
    seen = runner.sync(0)["t"]
    assert point_id("t", 2) in seen.points
    assert [d.details["error_code"] for d in seen.letters] == ["payload_value"]


# A number over 64 bits in a dead-lettered row (jsonb, numeric) is written to the state store
# as text (model.dumps); orjson used to fail the state commit, and so every run.
@pytest.mark.parametrize(
    ("tiny", "value"),
    [
        (("outbox", PG_T.format("jsonb"), "qdrant-edge"), '{"big": 1e400}'),
        (("logical", PG_T.format("numeric"), "qdrant-memory"), "1e30"),
    ],
    indirect=["tiny"],
)
def test_huge_number_is_dead_lettered(tiny: tuple[Any, InProcess], value: str) -> None:
    db, runner = tiny
    db.execute("INSERT INTO t VALUES (1, 'odd', %s), (2, 'good', NULL)", (value,))
    seen = runner.sync(0)["t"]
    assert point_id("t", 2) in seen.points
    assert [d.details["error_code"] for d in seen.letters] == ["payload_value"]


SQLITE_T = "CREATE TABLE t (id TEXT PRIMARY KEY, body TEXT, x REAL)"


# A NULL key's dead letter is named model.NULL_KEY; it used to be "None", which syncing the
# text key "None" resolved.
@pytest.mark.parametrize("tiny", [("sqlite", SQLITE_T, "qdrant-edge")], indirect=True)
def test_null_key_dead_letter_survives_a_text_key_none(tiny: tuple[Any, InProcess]) -> None:
    db, runner = tiny
    db.execute("INSERT INTO t VALUES (NULL, 'null key', 1)")
    runner.sync(0)
    db.execute("INSERT INTO t VALUES ('None', 'text key None', 1)")
    seen = runner.sync(0)["t"]
    assert [(d.details["key"], d.status) for d in seen.letters] == [(None, "pending")]
    assert point_id("t", "None") in seen.points


# A dead letter of an invalid key (here a blob) is not replayed: there is no key to re-read it
# by. Its replay used to enqueue the key's str() ("b'\\xff'"), find no such row and resolve
# the dead letter of a row still there, unsynced.
@pytest.mark.parametrize("tiny", [("sqlite", SQLITE_T, "qdrant-edge")], indirect=True)
def test_replayed_blob_key_stays_dead_lettered(tiny: tuple[Any, InProcess]) -> None:
    db, runner = tiny
    db.execute("INSERT INTO t VALUES (x'ff', 'blob key', 1)")
    [letter] = runner.sync(0)["t"].letters
    letters = runner.replay([letter], 0)["t"].letters  # replays none of them
    assert [d.status for d in letters] == ["pending"]


# qdrant-edge returns payload floats up to 1 ULP off (about a quarter of random doubles; the
# library's behaviour, not ours), so the check compares floats allowing a few ULP. It used to
# report payload_mismatch right after every sync, which check --repair could not clear.
@pytest.mark.parametrize("tiny", [("sqlite", SQLITE_T, "qdrant-edge")], indirect=True)
def test_check_tolerates_qdrant_edge_float_ulp(tiny: tuple[Any, InProcess]) -> None:
    db, runner = tiny
    x = 1.0135275337169743e-86  # qdrant-edge gives it back as 1.0135275337169745e-86
    db.execute("INSERT INTO t VALUES ('a', 'body', ?)", (x,))
    seen = runner.sync(0)["t"]
    returned = seen.points[point_id("t", "a")].payload["x"]
    assert abs(returned - x) <= math.ulp(x)  # equal, or the library's 1 ULP off
    assert seen.report is not None and seen.report.consistent, seen.report.drift
    engine, loop = runner.engine, runner.loop
    loop.run_until_complete(engine.repair(seen.report))  # check --repair: nothing to do
    for mode in ("full", "sample", "quick", "prove"):
        report = loop.run_until_complete(engine.check("t", mode=mode))
        assert report.consistent, (mode, report.drift)


# A key over 1000 characters is dead-lettered under a shortened key (model.key_text), which
# the check applies too; it used to report the row as missing.
@pytest.mark.parametrize("tiny", [("sqlite", SQLITE_T, "qdrant-memory")], indirect=True)
def test_check_knows_a_dead_lettered_long_key(tiny: tuple[Any, InProcess]) -> None:
    db, runner = tiny
    db.execute("INSERT INTO t VALUES (?, 'long key', 1)", ("k" * 1001,))
    seen = runner.sync(0)["t"]
    assert [d.details["error_code"] for d in seen.letters] == ["invalid_key"]
    assert seen.report is not None and seen.report.consistent, seen.report.counts


# SQLite keeps -2.0**63 as a REAL key (INT affinity cannot convert it) that equals the integer
# -2**63, in SQL and in Python. The re-read for the integer key finds the REAL row: it is not
# that record, so the point goes and the row is dead-lettered. The point used to stay for ever.
@pytest.mark.parametrize(
    "tiny",
    [("sqlite", "CREATE TABLE t (id BIGINT PRIMARY KEY, body TEXT, x REAL)", "qdrant-edge")],
    indirect=True,
)
def test_a_real_key_equal_to_an_integer_leaves_no_point(tiny: tuple[Any, InProcess]) -> None:
    db, runner = tiny
    db.execute("INSERT INTO t VALUES (?, 'integer key', 1)", (-(2**63),))
    runner.sync(0)
    db.execute("DELETE FROM t")
    db.execute("INSERT INTO t VALUES (?, 'real key', 1)", (-(2.0**63),))
    seen = runner.sync(0)["t"]
    assert seen.points == {}
    assert [(d.details["error_code"], d.status) for d in seen.letters] == [
        ("invalid_key", "pending")
    ]
    db.execute("DELETE FROM t")
    assert runner.sync(0)["t"].points == {}
