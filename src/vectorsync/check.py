"""Consistency checks between a source (the truth) and a sink (the index), with repair.

Each side reduces every record to a 64-bit digest of (key, text hash, payload hash, schema
version): the source by rendering its current rows, the sink from each point's bookkeeping
payload (no vectors read). Digests are XOR-folded into key-hash buckets; a Merkle root over
the buckets proves equality when the roots match, and only the records of differing buckets
are compared key by key. Categories: missing (no point), orphaned (a point without a live
row, or a foreign point), outdated (written under an older schema version or model), stale
(text differs) and payload mismatch.

A record with a pending dead letter is *known*: every mode reports it as ``dead_lettered``
(not as drift of another kind, and not making the check inconsistent) and leaves it out of
the comparison, so its kept last good point is never counted as orphaned nor deleted by a
repair. A row that cannot be rendered and is not yet dead-lettered is drift (``stale`` when
its point exists, else ``missing``): repairing it sends it through the sync path, which
dead-letters it and keeps its point.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import time
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import rbloom
import xxhash

from . import check_fold
from .check_fold import Entry, RecordDigests, chunk_digest, fine_bucket
from .check_fold import buckets as fine_buckets
from .check_fold import digest as record_digest
from .chunking import Chunker
from .conflicts import Conflict, Kept, Resolver
from .errors import RecordError
from .model import (
    DIGEST_BUCKETS,
    Key,
    SinkRecord,
    key_bucket,
    key_text,
    payload_hash,
    point_id,
    row_digest,
)
from .render import Renderer
from .sinks.base import PayloadScan, Sink
from .sources.base import Source
from .state.store import StateStore

__all__ = ["CATEGORIES", "KNOWN", "CheckReport", "Checker", "Drift", "wilson_interval"]

logger = logging.getLogger(__name__)

Category = Literal["missing", "orphaned", "outdated", "stale", "payload_mismatch", "dead_lettered"]
# drift: what makes a check inconsistent; dead_lettered records are known and reported apart
CATEGORIES: tuple[Category, ...] = ("missing", "orphaned", "outdated", "stale", "payload_mismatch")
KNOWN: Category = "dead_lettered"
BUCKETS = DIGEST_BUCKETS
_LOW31 = (1 << 31) - 1
_REPORTED_KEYS = 1000  # keys listed per category in a report (counts are always exact)


@dataclass(frozen=True, slots=True, kw_only=True)
class Drift:
    category: Category
    key: Key | None
    point_id: str
    unrenderable: bool = False  # the row cannot be rendered: a repair dead-letters it
    conflict: bool = False  # the sink's payload was edited by someone else (see conflicts)


@dataclass(slots=True, kw_only=True)
class CheckReport:
    mapping: str
    mode: str
    consistent: bool
    source_records: int
    sink_points: int
    counts: dict[str, int]
    drift: list[Drift] = field(default_factory=list)
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    id: int | None = None

    def keys(self, *categories: Category) -> list[Key]:
        return [d.key for d in self.drift if d.category in categories and d.key is not None]

    def as_dict(self) -> dict[str, Any]:
        listed: dict[str, list[Any]] = {c: [] for c in (*CATEGORIES, KNOWN)}
        for d in self.drift:
            if len(listed[d.category]) < _REPORTED_KEYS:
                listed[d.category].append(d.key if d.key is not None else d.point_id)
        return {
            "id": self.id,
            "mapping": self.mapping,
            "mode": self.mode,
            "consistent": self.consistent,
            "source_records": self.source_records,
            "sink_points": self.sink_points,
            "counts": self.counts,
            "seconds": round(self.seconds, 3),
            "keys": listed,
            **self.details,
        }


def _close(a: Any, b: Any) -> bool:
    """Equal, except that floats may differ by a few ULP."""
    if isinstance(a, float) or isinstance(b, float):
        if not isinstance(a, int | float) or not isinstance(b, int | float):
            return False
        return a == b or abs(a - b) <= 4 * math.ulp(max(abs(a), abs(b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def wilson_interval(hits: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if hits == 0 else max(0.0, centre - half)
    high = 1.0 if hits == n else min(1.0, centre + half)
    return low, high


_bucket = key_bucket
_COMPARE_PAGE = 2000  # drifted keys compared record by record per round trip
_FOLD_PAGE = 2000  # source rows folded per page (apart: per message to the process)
_FINE_ROWS = check_fold.FINE // BUCKETS


def _fold(fine: array[int]) -> list[int]:
    """The digest buckets of fine buckets: each XORs the fine buckets of its low bits
    (one row of BUCKETS words at a time, as one big integer)."""
    width = 8 * BUCKETS
    raw = fine.tobytes()
    acc = 0
    for row in range(_FINE_ROWS):
        acc ^= int.from_bytes(raw[row * width : (row + 1) * width], "little")
    return list(array("Q", acc.to_bytes(width, "little")))


def _differing(a: array[int], b: array[int]) -> set[int]:
    """The fine buckets where two sides differ."""
    if a == b:
        return set()
    return {i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y}


def _merkle_root(buckets: Sequence[int]) -> str:
    """The root of a binary Merkle tree over the bucket digests."""
    level = [xxhash.xxh3_64_hexdigest(d.to_bytes(8, "little")) for d in buckets]
    while len(level) > 1:
        level = [
            xxhash.xxh3_64_hexdigest((a + b).encode())
            for a, b in zip(level[::2], level[1::2], strict=True)
        ]
    return level[0]


class Checker:
    """Checks one mapping. ``model_id`` and ``schema_version`` are the current ones (from
    the schema registry), so checking never loads an embedding model."""

    def __init__(
        self,
        *,
        mapping: str,
        source: Source,
        table: str,
        key: str,
        renderer: Renderer,
        sink: Sink,
        collection: str,
        payload_fields: Iterable[str],
        model_id: str,
        schema_version: str,
        state: StateStore,
        digest_columns: tuple[str, ...],
        resolve: Callable[[dict[Key, dict[str, Any]]], Awaitable[None]] | None = None,
        state_name: str | None = None,
        chunker: Chunker | None = None,
        family: str | None = None,
        select: Callable[[Mapping[str, Any]], bool] | None = None,
        resolver: Resolver | None = None,
        kept: Mapping[str, Kept] | None = None,
        vectors: Callable[[], Awaitable[list[tuple[Key, str, Conflict]]]] | None = None,
    ) -> None:
        self.mapping, self.source, self.table, self.key = mapping, source, table, key
        self.family = family or mapping  # the name point ids derive from (MappingConfig.family)
        self.select = select  # the rows this mapping holds (MappingConfig.selects), None: all
        self.state_name = state_name or mapping  # the index version's record state
        self.resolve = resolve  # completes rows as the sync does (related fields)
        self.renderer, self.sink, self.collection = renderer, sink, collection
        self.payload_fields = tuple(payload_fields)
        self.model_id, self.schema_version = model_id, schema_version
        self.state, self.digest_columns = state, digest_columns
        self.resolver = resolver  # finds conflicts: points edited in the sink by others
        self.kept = kept or {}  # sink values a conflict policy keeps over the source's
        self.vectors = vectors  # full mode: points whose vector others changed (conflicts)
        self.chunker = chunker  # a chunked mapping: each record is the set of its chunk points
        self.digests = RecordDigests(
            renderer=renderer,
            model_id=model_id,
            schema_version=schema_version,
            payload_fields=payload_fields,
            family=self.family,
            kept=self.kept,
            chunker=chunker,
        )
        self.payload_fields = self.digests.payload_fields  # with a chunk's own fields

    # -- reading each side ----------------------------------------------------------------
    def _sink_entry(self, payload: Mapping[str, Any], pid: str) -> Entry:
        fields = {f: payload.get(f) for f in self.payload_fields}
        return Entry(
            text_hash=payload.get("_vs_text_hash"),
            payload_hash=payload_hash(fields),
            schema=payload.get("_vs_schema"),
            point_id=pid,
        )

    async def _known(self) -> set[str]:
        """Keys with a dead letter still open: known, reported apart from drift."""
        letters = await self.state.dead_letters(self.state_name, status=None)
        return {d.key for d in letters if d.status in ("pending", "processing")}

    def _known_drift(self, keys: Iterable[Key]) -> list[Drift]:
        return [Drift(category=KNOWN, key=k, point_id=point_id(self.family, k)) for k in keys]

    async def _rows(self, page: int = 2000) -> AsyncIterator[dict[str, Any]]:
        """Every current source row this mapping holds, completed the way the sync
        completes it."""
        select = self.select or (lambda _: True)
        if self.resolve is None:
            async for row in self.source.scan(self.table, self.key):
                if select(row):
                    yield row
            return
        rows: dict[Key, dict[str, Any]] = {}
        async for row in self.source.scan(self.table, self.key, page=page):
            rows[row[self.key]] = row
            if len(rows) >= page:
                await self.resolve(rows)
                for done in rows.values():
                    if select(done):
                        yield done
                rows = {}
        await self.resolve(rows)
        for done in rows.values():
            if select(done):
                yield done

    async def _keys(self) -> list[Key]:
        """The key of every source row this mapping holds."""
        if self.select is None:
            return [row[self.key] async for row in self.source.scan(self.table, self.key)]
        return [row[self.key] async for row in self._rows()]

    # -- modes ------------------------------------------------------------------------------
    async def full(self) -> CheckReport:
        """Every record of both sides, in memory bounded by the digest buckets, not by the
        records: each side XOR-folds every record's digest into fine buckets of its key hash
        (a fixed array of 64-bit words per side), the source pass and the sink pass of each
        point's bookkeeping fields side by side. Only when fine buckets differ are both sides
        read once more, for the keys of those buckets alone, and those compared record by
        record."""
        started = time.monotonic()
        known = await self._known()
        (
            (src, records, unrenderable, present, folded),
            (snk, points, foreign),
        ) = await asyncio.gather(self._source_digests(known), self._sink_digests(known))
        drift = self._known_drift(present)
        drift += [Drift(category="orphaned", key=None, point_id=pid) for pid in foreign]
        src_buckets, snk_buckets = _fold(src), _fold(snk)
        wanted = _differing(src, snk)
        del src, snk
        pointed: set[Key] = set()  # unrenderable keys that have a point (their bucket differs)
        if wanted:
            suspects = await self._suspects(wanted, known, unrenderable, set(foreign), pointed)
            held = await self._points_of(suspects) if self.chunker and suspects else None
            for start in range(0, len(suspects), _COMPARE_PAGE):
                drift += await self.compare_keys(suspects[start : start + _COMPARE_PAGE], held)
        for key in unrenderable:  # the sync would dead-letter it (and keep its point)
            category: Category = "stale" if key in pointed else "missing"
            drift.append(Drift(category=category, key=key, point_id=point_id(self.family, key)))
        drift += await self._vector_conflicts(drift)
        differing = sum(1 for a, b in zip(src_buckets, snk_buckets, strict=True) if a != b)
        return self._report(
            "full",
            started,
            drift,
            records,
            points,
            {
                "source_root": _merkle_root(src_buckets),
                "sink_root": _merkle_root(snk_buckets),
                "buckets": BUCKETS,
                "buckets_differing": differing,
                "unrenderable": len(unrenderable),
                "source_folded": folded,
            },
        )

    async def _source_digests(
        self, known: set[str]
    ) -> tuple[array[int], int, set[Key], list[Key], str]:
        """The source side of a full check: fine buckets of record digests, the number of
        records, the keys that cannot be rendered (nothing folded in for them) and those
        with an open dead letter, and where they were folded ("apart" or "here"). A large
        mapping's rows are folded in a process of its own (``check_fold``), beside the
        sink side read here."""
        apart = await self.sink.count(self.collection) >= check_fold.APART_RECORDS
        try:
            return await self._fold_source(known, apart=apart)
        except check_fold.ProcessLost as exc:  # it ended with its buckets: all again, here
            logger.warning(
                "%s; the check folds the source of %r again itself",
                exc,
                self.mapping,
                extra={"action": "check_fold_here", "mapping": self.mapping},
            )
            return await self._fold_source(known, apart=False)

    async def _fold_source(
        self, known: set[str], *, apart: bool
    ) -> tuple[array[int], int, set[Key], list[Key], str]:
        present: list[Key] = []
        records = 0
        page: list[tuple[Key, Mapping[str, Any]]] = []
        name = self.key
        async with check_fold.SourceFold(self.digests, apart=apart) as fold:
            async for row in self._rows():
                records += 1
                key = row[name]
                if known and key_text(key) in known:
                    present.append(key)
                    continue
                page.append((key, row))
                if len(page) >= _FOLD_PAGE:
                    await fold.add(page)
                    page = []
            await fold.add(page)
            src, unrenderable = await fold.result()
        return src, records, unrenderable, present, "apart" if fold.pages_apart else "here"

    async def _sink_digests(self, known: set[str]) -> tuple[array[int], int, list[str]]:
        """The sink side of a full check: fine buckets of point digests, the number of
        points and the ids of foreign points (no key of this mapping's). A point of an
        unrenderable row is folded in like any: its bucket differs and ``_suspects`` finds
        it."""
        snk = fine_buckets()
        points, foreign = 0, []
        family, chunked, fields = self.family, self.chunker is not None, self.payload_fields
        async for page in self._payload_pages():
            points += len(page)
            for pid, payload in page:
                key = payload.get("_vs_key")
                if key is None or (not chunked and pid != point_id(family, key)):
                    foreign.append(pid)
                    continue
                if known and key_text(key) in known:
                    continue
                text_hash = payload.get("_vs_text_hash")
                schema = payload.get("_vs_schema")
                if chunked:
                    phash = payload_hash({f: payload.get(f) for f in fields})
                    digest = chunk_digest(key, Entry(text_hash, phash, schema, pid))
                else:
                    digest = record_digest(key, text_hash, schema, [payload.get(f) for f in fields])
                snk[fine_bucket(key)] ^= digest
        return snk, points, foreign

    async def _payload_pages(
        self, fields: Sequence[str] | None = None
    ) -> AsyncIterator[Sequence[tuple[str, Mapping[str, Any]]]]:
        """Every point's id and bookkeeping payload, a page at a time."""
        if fields is None:
            fields = ("_vs_key", "_vs_text_hash", "_vs_schema", *self.payload_fields)
        if isinstance(self.sink, PayloadScan):
            async for page in self.sink.scroll_payloads(self.collection, fields, page=5000):
                yield page
            return
        pairs: list[tuple[str, Mapping[str, Any]]] = []
        async for record in self.sink.scroll(self.collection, page=2000):
            pairs.append((record.id, record.payload))
            if len(pairs) >= 2000:
                yield pairs
                pairs = []
        if pairs:
            yield pairs

    async def _suspects(
        self,
        wanted: set[int],
        known: set[str],
        unrenderable: set[Key],
        foreign: set[str],
        pointed: set[Key],
    ) -> list[Key]:
        """The keys of the fine buckets that differ, from both sides (source order first):
        the only records a full check compares one by one. Unrenderable keys seen with a
        point are added to ``pointed``."""
        found: dict[Key, None] = {}
        for key in await self._keys():
            if (
                fine_bucket(key) in wanted
                and key not in unrenderable
                and key_text(key) not in known
            ):
                found[key] = None
        async for page in self._payload_pages(("_vs_key",)):
            for pid, payload in page:
                held = payload.get("_vs_key")
                if held is None or pid in foreign:
                    continue
                if held in unrenderable:
                    pointed.add(held)
                    continue
                if fine_bucket(held) in wanted and key_text(held) not in known:
                    found[held] = None
        return list(found)

    def _compare(self, key: Key, src: Entry | None, snk: Entry | None) -> Drift | None:
        if src is None and snk is None:
            return None
        if snk is None:
            assert src is not None
            return Drift(category="missing", key=key, point_id=src.point_id)
        if src is None:
            return Drift(category="orphaned", key=key, point_id=snk.point_id)
        if snk.schema != src.schema:
            return Drift(category="outdated", key=key, point_id=snk.point_id)
        if snk.text_hash != src.text_hash:
            return Drift(category="stale", key=key, point_id=snk.point_id)
        if snk.payload_hash != src.payload_hash:
            return Drift(category="payload_mismatch", key=key, point_id=snk.point_id)
        return None

    async def prove(self) -> CheckReport:
        """The fast path: prove that every current source row is what was last synced, and
        that the sink holds as many points as were written.

        The source's raw rows are reduced to per-bucket sums of row digests in one pass
        (nothing is rendered); the state store keeps the same sums for what was synced and
        aggregates them inside the database; the sink is only counted. Edits made directly
        in the sink are not seen here unless they change its point count: ``full`` reads
        every point for that."""
        started = time.monotonic()
        known = await self._known()
        sums = [[0, 0] for _ in range(BUCKETS)]
        rows, present = 0, []
        async for row in self._rows():
            rows += 1
            key = row[self.key]
            if key_text(key) in known:
                present.append(key)
                continue
            d = row_digest(row, self.digest_columns)
            acc = sums[_bucket(key)]
            acc[0] += d >> 31
            acc[1] += d & _LOW31
        synced, records, written = await self.state.bucket_sums(self.state_name)
        for key, d in (await self.state.record_digests(self.state_name, present)).items():
            b = _bucket(key)
            hi, lo = synced.get(b, (0, 0))
            synced[b] = (hi - (d >> 31), lo - (d & _LOW31))
        points = await self.sink.count(self.collection)
        differing = [b for b in range(BUCKETS) if tuple(sums[b]) != synced.get(b, (0, 0))]
        drift = self._known_drift(present)
        if differing:
            drift += await self._drill(differing, known)
        report = self._report(
            "prove",
            started,
            drift,
            rows,
            points,
            {
                "buckets": BUCKETS,
                "buckets_differing": len(differing),
                "synced_records": records,
                "synced_points": written,
                "sink_count_matches": points == written,
            },
        )
        report.consistent = report.consistent and points == written
        return report

    async def _drill(self, buckets: list[int], known: set[str]) -> list[Drift]:
        wanted = set(buckets)
        synced = await self.state.bucket_digests(self.state_name, buckets)
        current: dict[str, tuple[Key, int]] = {}
        async for row in self._rows():
            key = row[self.key]
            if _bucket(key) in wanted:
                current[str(key)] = (key, row_digest(row, self.digest_columns))
        drift = []
        for skey in sorted(k for k in set(synced) | set(current) if key_text(k) not in known):
            pid = point_id(self.family, skey)
            if skey not in synced:
                drift.append(Drift(category="missing", key=current[skey][0], point_id=pid))
            elif skey not in current:
                drift.append(Drift(category="orphaned", key=skey, point_id=pid))
            elif synced[skey] != current[skey][1]:
                drift.append(Drift(category="stale", key=current[skey][0], point_id=pid))
        return drift

    async def sample(self, size: int, *, seed: int | None = None) -> CheckReport:
        """Compare ``size`` random source records with their points: an estimate of the
        share of source records whose point is missing or wrong, with a 95% interval
        (dead-lettered records are known, so they are reported and not sampled)."""
        started = time.monotonic()
        known = await self._known()
        keys = await self._keys()
        present = [k for k in keys if key_text(k) in known]
        candidates = [k for k in keys if key_text(k) not in known]
        chosen = random.Random(seed).sample(candidates, min(size, len(candidates)))
        drift = await self.compare_keys(chosen)
        low, high = wilson_interval(len(drift), len(chosen))
        estimate = {
            "sampled": len(chosen),
            "drifted": len(drift),
            "rate": len(drift) / len(chosen) if chosen else 0.0,
            "low": low,
            "high": high,
            "confidence": 0.95,
            "estimated_drifted_records": round(len(candidates) * len(drift) / len(chosen))
            if chosen
            else 0,
        }
        return self._report(
            "sample",
            started,
            [*self._known_drift(present), *drift],
            len(keys),
            await self.sink.count(self.collection),
            {"estimate": estimate},
        )

    async def _points_of(self, keys: Sequence[Key]) -> dict[Key, list[SinkRecord]]:
        """Every point the sink holds of ``keys`` (chunked records: a point of a record can
        be found by its key only, so the collection is read once more)."""
        wanted = set(keys)
        held: dict[Key, list[SinkRecord]] = {k: [] for k in keys}
        async for record in self.sink.scroll(self.collection, page=2000):
            key = record.payload.get("_vs_key")
            if key in wanted:
                held[key].append(record)
        return held

    async def _chunked_compare(
        self,
        keys: Sequence[Key],
        rows: Mapping[Key, Mapping[str, Any]],
        held: Mapping[Key, list[SinkRecord]] | None,
    ) -> list[Drift]:
        """Chunked records, chunk by chunk: a chunk point missing, one that is not a chunk
        of the record's current text (orphaned: it is deleted by a repair), or stale."""
        if held is None:  # the points the record should have, and those it was written as
            states = await self.state.record_states(self.state_name, [str(k) for k in keys])
            expected: dict[str, Key] = {}
            for key in keys:
                state = states.get(str(key))
                expected.update((pid, key) for pid in (state.point_ids if state else []))
                row = rows.get(key)
                if row is not None:
                    with contextlib.suppress(RecordError):
                        rendered = self.renderer.render(row)
                        expected.update(
                            (pid, key) for pid in self.digests.chunk_entries(key, rendered)
                        )
            held = {k: [] for k in keys}
            for rec in await self.sink.retrieve(self.collection, list(expected)):
                held[expected[rec.id]].append(rec)
        drift: list[Drift] = []
        for key in keys:
            points = {r.id: r for r in held.get(key, [])}
            row = rows.get(key)
            if row is None:
                drift += [Drift(category="orphaned", key=key, point_id=p) for p in points]
                continue
            try:
                rendered = self.renderer.render(row)
                entries = self.digests.chunk_entries(key, rendered)
            except RecordError:  # unrenderable, not yet known
                category: Category = "stale" if points else "missing"
                pid = point_id(self.family, key)
                drift.append(Drift(category=category, key=key, point_id=pid, unrenderable=True))
                continue
            for pid, (src, fields) in entries.items():
                held_point = points.get(pid)
                snk = None if held_point is None else self._sink_entry(held_point.payload, pid)
                d = self._compare(key, src, snk)
                if (
                    d is not None
                    and d.category == "payload_mismatch"
                    and held_point is not None
                    and _close(fields, {f: held_point.payload.get(f) for f in fields})
                ):
                    d = None  # float noise only
                if d is not None:
                    drift.append(d)
            drift += [
                Drift(category="orphaned", key=None, point_id=p) for p in points if p not in entries
            ]
        return drift

    async def compare_keys(
        self, keys: Sequence[Key], held: Mapping[Key, list[SinkRecord]] | None = None
    ) -> list[Drift]:
        """Each of ``keys`` compared with its point now, record by record (what a sample
        compares, and how drift found while a sync streams is confirmed); ``held``: the
        points of chunked records, when they were read already."""
        rows = await self.source.fetch(self.table, self.key, list(keys))
        if self.resolve is not None and rows:
            await self.resolve(rows)
        if self.select is not None:  # another mapping's rows (embedder_by) are not this one's
            rows = {k: row for k, row in rows.items() if self.select(row)}
        if self.chunker is not None:
            return await self._chunked_compare(keys, rows, held)
        ids = {point_id(self.family, k): k for k in keys}
        found = {r.id: r for r in await self.sink.retrieve(self.collection, list(ids))}
        drift: list[Drift] = []
        for pid, key in ids.items():
            row = rows.get(key)
            src = self.digests.entry(row, key) if row is not None else None
            rec = found.get(pid)
            snk = self._sink_entry(rec.payload, pid) if rec is not None else None
            d = self._compare(key, src, snk)
            if d is not None and d.category == "payload_mismatch" and row is not None:
                assert rec is not None
                wanted = self.digests.fields(key, self.renderer.render(row))
                if _close(wanted, {f: rec.payload.get(f) for f in self.payload_fields}):
                    d = None  # float noise only
            if d is None and row is not None and src is None:  # unrenderable, not yet known
                category: Category = "stale" if rec else "missing"
                d = Drift(category=category, key=key, point_id=pid, unrenderable=True)
            if d is not None:
                drift.append(d)
        return await self._conflicts(drift, rows, found)

    async def _conflicts(
        self,
        drift: list[Drift],
        rows: Mapping[Key, Mapping[str, Any]],
        found: Mapping[str, SinkRecord],
    ) -> list[Drift]:
        """Of ``drift``, the points whose payload someone else edited (it differs from
        what the sync last wrote): marked, and logged as conflicts (once while open)."""
        resolver = self.resolver
        suspects = [d for d in drift if d.category == "payload_mismatch" and d.key is not None]
        if resolver is None or not suspects:
            return drift
        states = await self.state.record_states(
            self.state_name, [key_text(d.key) for d in suspects]
        )
        marked, logged = {}, []
        for d in suspects:
            assert d.key is not None
            state, rec, row = states.get(key_text(d.key)), found.get(d.point_id), rows.get(d.key)
            if state is None or rec is None or row is None:
                continue
            source = self.digests.fields(d.key, self.renderer.render(row))
            res = resolver.resolve(key_text(d.key), state.payload, source, rec.payload)
            if res is not None and resolver.edited(state.payload, rec.payload):
                logged.append(dataclasses.replace(res.conflict, detected="check"))
                marked[d.point_id] = dataclasses.replace(d, conflict=True)
        if logged:
            await self.state.log_conflicts(logged)
        return [marked.get(d.point_id, d) for d in drift]

    async def _vector_conflicts(self, drift: list[Drift]) -> list[Drift]:
        """Points whose vector someone else changed: logged (once while open), and stale."""
        if self.vectors is None:
            return []
        found = await self.vectors()
        if found:
            await self.state.log_conflicts([c for _, _, c in found])
        drifted = {d.key for d in drift}
        return [
            Drift(category="stale", key=key, point_id=pid, conflict=True)
            for key, pid, _ in found
            if key not in drifted
        ]

    async def confirm(self, report: CheckReport) -> None:
        """Keep only the drift that is still there: compare the drifted records again
        (after a streaming sync applied what was in flight when the check read them)."""
        known = await self._known()
        keyed = [d.key for d in report.drift if d.key is not None and d.category != KNOWN]
        still = {(d.category, d.key) for d in await self.compare_keys(keyed)}
        kept = [
            d
            for d in report.drift
            if d.key is None
            or d.category == KNOWN
            or (d.category, d.key) in still
            or key_text(d.key) in known
            or (d.conflict and d.category == "stale")  # a vector: compare_keys reads none
        ]
        report.drift = kept
        report.counts = {c: 0 for c in (*CATEGORIES, KNOWN)}
        for d in kept:
            report.counts[d.category] += 1
        report.consistent = all(d.category == KNOWN for d in kept) and report.details.get(
            "sink_count_matches", True
        )

    async def quick(self) -> CheckReport:
        """Existence only: Bloom filters of each side's point ids against the other's."""
        started = time.monotonic()
        known = await self._known()
        keys = await self._keys()
        present = [k for k in keys if key_text(k) in known]
        unsynced: list[Key] = []  # chunked records the record state has no chunks of
        if self.chunker is None:
            expected = {point_id(self.family, k): k for k in keys if key_text(k) not in known}
            kept = [point_id(self.family, k) for k in present]
        else:
            expected, kept, unsynced = await self._listed_chunks(keys, known)
        sink_ids = [
            r.id async for r in self.sink.scroll(self.collection, with_payload=False, page=5000)
        ]
        in_sink = rbloom.Bloom(max(1, len(sink_ids)), 1e-6)
        in_sink.update(sink_ids)
        in_source = rbloom.Bloom(max(1, len(expected) + len(kept)), 1e-6)
        in_source.update([*expected, *kept])
        drift = self._known_drift(present)
        drift += [
            Drift(category="missing", key=k, point_id=point_id(self.family, k)) for k in unsynced
        ]
        drift += [
            Drift(category="missing", key=k, point_id=pid)
            for pid, k in expected.items()
            if pid not in in_sink
        ]
        drift += [
            Drift(category="orphaned", key=None, point_id=pid)
            for pid in sink_ids
            if pid not in in_source
        ]
        return self._report(
            "quick", started, drift, len(keys), len(sink_ids), {"false_positive_rate": 1e-6}
        )

    async def _listed_chunks(
        self, keys: list[Key], known: set[str]
    ) -> tuple[dict[str, Key], list[str], list[Key]]:
        """A chunked mapping's points as the record state lists them: point id → key for
        the records compared, the point ids of dead-lettered records (kept), and the
        records without state (missing)."""
        expected: dict[str, Key] = {}
        kept: list[str] = []
        unsynced: list[Key] = []
        for start in range(0, len(keys), _COMPARE_PAGE):
            page = keys[start : start + _COMPARE_PAGE]
            states = await self.state.record_states(self.state_name, [str(k) for k in page])
            for key in page:
                state = states.get(str(key))
                if key_text(key) in known:
                    kept.extend(state.point_ids if state else [])
                elif state is None or not state.chunks:
                    unsynced.append(key)
                else:
                    expected.update((pid, key) for pid in state.point_ids)
        return expected, kept, unsynced

    def _report(
        self,
        mode: str,
        started: float,
        drift: list[Drift],
        source_records: int,
        sink_points: int,
        details: dict[str, Any],
    ) -> CheckReport:
        counts: dict[str, int] = {c: 0 for c in (*CATEGORIES, KNOWN)}
        for d in drift:
            counts[d.category] += 1
        return CheckReport(
            mapping=self.mapping,
            mode=mode,
            consistent=all(d.category == KNOWN for d in drift),
            source_records=source_records,
            sink_points=sink_points,
            counts=counts,
            drift=drift,
            seconds=time.monotonic() - started,
            details=details,
        )
