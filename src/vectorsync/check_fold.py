"""The source side of a full check: every record reduced to a 64-bit digest and XOR-folded
into fine buckets of its key hash, here or in a process of its own.

Rendering every row is CPU-bound Python; in the checking process it takes turns for the
GIL with reading the sink's points, so a full check used one core of two. A large mapping
folds its rows apart: ``python -m vectorsync.check_fold``, fed pages of rows over its
standard input as length-prefixed pickles, answering each page with the keys it could not
render and, at the end, its buckets. The checking process still reads the source (its
connections, its related fields) and keeps nothing but the pages in flight.

XOR folds in any order, so whatever the process cannot take is folded here instead and
the halves add up to the same buckets: a page whose values do not pickle is folded here,
and so is everything after an error the process reports (with the buckets it had folded);
if the process dies, the whole source side is folded again here.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import pickle
import struct
import sys
from array import array
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

from . import _failpoints
from .chunking import CHUNK_FIELDS, Chunker, chunk_point_id
from .conflicts import Kept, apply_kept
from .errors import RecordError
from .model import Key, content_hash, dumps, key_text, payload_hash, point_id
from .render import Rendered, Renderer

__all__ = ["APART_RECORDS", "FINE", "Entry", "RecordDigests", "SourceFold", "fine_bucket"]

logger = logging.getLogger(__name__)

# fine buckets of the key hash, a multiple of the digest buckets (a fine bucket's low bits
# are its digest bucket), ~4 records each at 1M records: 2 MiB per side
FINE = 1 << 18
# from how many points a full check folds its source apart (starting the process takes
# about a second: below this, folding here is as quick)
APART_RECORDS = 100_000
_IN_FLIGHT = 3  # pages sent and not yet answered: the process never waits for the next
_HEADER = struct.Struct("<Q")
_PIPE_BYTES = 1 << 20

Page = Sequence[tuple[Key, Mapping[str, Any]]]


@dataclass(frozen=True, slots=True)
class Entry:
    text_hash: str | None
    payload_hash: str
    schema: str | None
    point_id: str


def digest(key: Key, text_hash: str | None, schema: str | None, values: list[Any]) -> int:
    """What a record is, in 64 bits: the same for a source row and its point when in sync.
    ``values``: the payload fields compared, in the mapping's order (JSON-equal values are
    equal, as ``payload_hash`` has it); one serialisation and one hash per record."""
    return xxhash.xxh3_64_intdigest(dumps([str(key), text_hash, schema, *values]))


def chunk_digest(key: Key, entry: Entry) -> int:
    """What one chunk point of a record is; a chunked record's digest XORs its chunks'."""
    return xxhash.xxh3_64_intdigest(
        f"{key}\x1f{entry.point_id}\x1f{entry.text_hash}\x1f{entry.payload_hash}"
        f"\x1f{entry.schema}".encode()
    )


def fine_bucket(key: Key) -> int:
    """The fine bucket of a key: ``key_bucket`` is its low bits."""
    return xxhash.xxh3_64_intdigest(str(key).encode()) & (FINE - 1)


class RecordDigests:
    """What the sync writes for a source record, as a check compares it: its entry, its
    payload fields, its chunk points and its digest. Pickles (the renderer and the chunker
    are rebuilt from their settings), so a process of its own can fold records."""

    def __init__(
        self,
        *,
        renderer: Renderer,
        model_id: str,
        schema_version: str,
        payload_fields: Iterable[str],
        family: str,
        kept: Mapping[str, Kept] | None = None,
        chunker: Chunker | None = None,
    ) -> None:
        self.renderer, self.model_id, self.schema_version = renderer, model_id, schema_version
        self.family = family  # the name point ids derive from (MappingConfig.family)
        self.kept = dict(kept or {})  # sink values a conflict policy keeps over the source's
        self.chunker = chunker  # a chunked mapping: each record is the set of its chunk points
        self.payload_fields = tuple(payload_fields)
        if chunker is not None:
            stored = CHUNK_FIELDS if chunker.config.store_text else CHUNK_FIELDS[:-1]
            self.payload_fields = (*self.payload_fields, *stored)

    def entry(self, row: Mapping[str, Any], key: Key) -> Entry | None:
        """A row's entry, None when it cannot be rendered (it cannot be synced as it is)."""
        try:
            rendered = self.renderer.render(row)
        except RecordError:
            return None
        return Entry(
            text_hash=content_hash(self.model_id, rendered.text),
            payload_hash=self.payload_hash(key, rendered),
            schema=self.schema_version,
            point_id=point_id(self.family, key),
        )

    def fields(self, key: Key, rendered: Rendered) -> dict[str, Any]:
        """The payload fields the sync writes for a record: the source's, with the sink
        values its conflict policy keeps."""
        kept = self.kept.get(key_text(key))
        return apply_kept(rendered.payload, kept)[0] if kept else dict(rendered.payload)

    def payload_hash(self, key: Key, rendered: Rendered) -> str:
        if key_text(key) not in self.kept:
            return rendered.payload_hash
        return payload_hash(self.fields(key, rendered))

    def chunk_entries(
        self, key: Key, rendered: Rendered
    ) -> dict[str, tuple[Entry, dict[str, Any]]]:
        """A chunked record's points as the sync writes them: point id → (entry, the
        payload fields compared)."""
        assert self.chunker is not None
        chunks = self.chunker.split(rendered.text)
        entries = {}
        for c in chunks:
            fields = {
                **rendered.payload,
                "chunk_index": c.index,
                "chunk_count": len(chunks),
                "chunk_start": c.start,
                "chunk_end": c.end,
            }
            if self.chunker.config.store_text:
                fields["chunk_text"] = c.text
            pid = chunk_point_id(self.family, key, c)
            entry = Entry(
                text_hash=content_hash(self.model_id, c.text),
                payload_hash=payload_hash(fields),
                schema=self.schema_version,
                point_id=pid,
            )
            entries[pid] = (entry, fields)
        return entries

    def record(self, key: Key, rendered: Rendered) -> int:
        """A source record's digest: its point's, or the XOR of its chunk points'."""
        text_hash = content_hash(self.model_id, rendered.text)
        if self.chunker is None:
            fields = self.fields(key, rendered) if key_text(key) in self.kept else rendered.payload
            values = [fields.get(f) for f in self.payload_fields]
            return digest(key, text_hash, self.schema_version, values)
        record = 0
        for entry, _ in self.chunk_entries(key, rendered).values():
            record ^= chunk_digest(key, entry)
        return record

    def fold(self, rows: Page, into: array[int]) -> list[Key]:
        """XOR each row's digest into its key's fine bucket: the keys that cannot be
        rendered (nothing folded in for them)."""
        unrenderable, folded = [], []
        render, record = self.renderer.render, self.record
        for key, row in rows:
            try:
                folded.append((fine_bucket(key), record(key, render(row))))
            except RecordError:  # cannot be synced as it is
                unrenderable.append(key)
        for bucket, value in folded:  # a page folds whole or not at all (an error above)
            into[bucket] ^= value
        return unrenderable


def _widen(stream: asyncio.StreamWriter | None) -> None:
    """A pipe that holds a whole page (Linux: up to pipe-max-size, 1 MiB by default): a
    page written while this process is busy elsewhere reaches the folding process at
    once, not a 64 KiB piece per turn of the event loop."""
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None)
    if stream is None or setsize is None:
        return
    with contextlib.suppress(OSError):
        fcntl.fcntl(stream.get_extra_info("pipe").fileno(), setsize, _PIPE_BYTES)


def buckets() -> array[int]:
    return array("Q", bytes(8 * FINE))


class ProcessLost(Exception):
    """The folding process ended without its buckets: fold the source here."""


class SourceFold:
    """Folds pages of (key, row), in a process of its own when ``apart``; :meth:`result`
    gives the buckets and the keys that cannot be rendered."""

    def __init__(self, digests: RecordDigests, *, apart: bool) -> None:
        self.digests = digests
        self.apart = apart
        self.here = buckets()  # what this process folded
        self.unrenderable: set[Key] = set()
        self._proc: asyncio.subprocess.Process | None = None
        self._sent: deque[Page] = deque()  # pages the process has not answered yet
        self.pages_apart = 0  # pages the process folded

    async def __aenter__(self) -> SourceFold:
        if not self.apart:
            return self
        try:
            recipe = pickle.dumps(self.digests, protocol=pickle.HIGHEST_PROTOCOL)
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "vectorsync.check_fold",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                # it imports this vectorsync, wherever this process found it
                env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
            )
            _widen(self._proc.stdin)
            await self._write(recipe)
        except Exception as exc:  # cannot fold apart (no process, a value that does not pickle)
            logger.warning(
                "cannot fold the source apart (%s: %s); the check folds it itself",
                type(exc).__name__,
                exc,
                extra={"action": "check_fold_here"},
            )
            await self.__aexit__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()

    async def add(self, page: Page) -> None:
        if not page:  # nothing to fold: no message, and not a page folded apart
            return
        if self._proc is None:
            self.unrenderable.update(self.digests.fold(page, self.here))
            return
        try:
            frame = pickle.dumps(("page", page), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # a value that does not pickle (a driver's own type): fold it here
            self.unrenderable.update(self.digests.fold(page, self.here))
            return
        self._sent.append(page)
        await self._write(frame)
        while len(self._sent) >= _IN_FLIGHT and self._proc is not None:
            await self._answer()

    async def result(self) -> tuple[array[int], set[Key]]:
        if self._proc is not None:
            await self._write(pickle.dumps(("end",)))
            while self._sent and self._proc is not None:
                await self._answer()
        if self._proc is not None:
            kind, raw = await self._read()
            assert kind == "done", kind
            self._merge(raw)
            await self._proc.wait()
            self._proc = None
        return self.here, self.unrenderable

    # -- the process ------------------------------------------------------------------------
    async def _write(self, frame: bytes) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(_HEADER.pack(len(frame)) + frame)
            await self._proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ProcessLost("the folding process is gone") from exc

    async def _read(self) -> tuple[Any, ...]:
        assert self._proc is not None and self._proc.stdout is not None
        try:
            (size,) = _HEADER.unpack(await self._proc.stdout.readexactly(_HEADER.size))
            reply: tuple[Any, ...] = pickle.loads(await self._proc.stdout.readexactly(size))
        except asyncio.IncompleteReadError as exc:
            raise ProcessLost("the folding process ended") from exc
        return reply

    async def _answer(self) -> None:
        """The process's answer to the oldest page sent: its unrenderable keys, or an
        error, after which what it folded joins this side and the rest is folded here."""
        kind, *rest = await self._read()
        if kind == "ok":
            self._sent.popleft()
            self.pages_apart += 1
            self.unrenderable.update(rest[0])
            return
        message, raw = rest
        logger.warning(
            "folding apart failed (%s); the check folds the rest of the source itself",
            message,
            extra={"action": "check_fold_here"},
        )
        self._merge(raw)
        assert self._proc is not None
        await self._proc.wait()
        self._proc = None
        while self._sent:  # not folded there: here (a genuine error raises here too)
            self.unrenderable.update(self.digests.fold(self._sent.popleft(), self.here))

    def _merge(self, raw: bytes) -> None:
        there = array("Q")
        there.frombytes(raw)
        for i, word in enumerate(there):
            if word:
                self.here[i] ^= word


def serve() -> None:
    """The folding process: the digests, then pages until ``end``, on standard input;
    answers on standard output (anything printed goes to standard error)."""
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr

    def read() -> Any:
        header = inp.read(_HEADER.size)
        if len(header) < _HEADER.size:
            raise SystemExit(0)  # the checking process went away
        (size,) = _HEADER.unpack(header)
        return pickle.loads(inp.read(size))

    def write(value: Any) -> None:
        frame = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        out.write(_HEADER.pack(len(frame)) + frame)
        out.flush()

    digests: RecordDigests = read()
    folded = buckets()
    while True:
        kind, *rest = read()
        if kind == "end":
            write(("done", folded.tobytes()))
            return
        try:
            unrenderable = digests.fold(rest[0], folded)
            _failpoints.hit("check_fold_page")
            write(("ok", unrenderable))
        except Exception as exc:  # named to the checking process, which folds it itself
            write(("error", f"{type(exc).__name__}: {exc}", folded.tobytes()))
            return


if __name__ == "__main__":
    from vectorsync.check_fold import serve as serve_here  # the module's own classes

    serve_here()
