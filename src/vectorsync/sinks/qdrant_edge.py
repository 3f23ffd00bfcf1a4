"""qdrant-edge sink: Qdrant's engine in-process, one shard folder per collection.

An update that has returned is in the shard's write-ahead log and survives a crash, so a
returned call is an acknowledged write. A shard has a single writer: we hold an advisory
lock on the folder so a second process gets a clear error instead of a WAL lock failure.

qdrant-edge writes its segments and WAL through mmap into sparse files, so a full disk is
not an error it can return: the kernel kills the process with SIGBUS. Every write first
checks that ``min_free_space`` MiB are free under the folder and raises SinkError (a
retryable outage) when they are not. The margin must cover one write: a batch of 1,000
384-d points allocates about 4 MiB (14 MiB at 1,536-d), and loading a collection fills in
the sparse files it maps (37 MiB the first time for a small 384-d one). Space taken by
another process between the check and the write can still end in SIGBUS; only a margin
over the largest write guards against that.

qdrant-edge has no aliases: an alias is a symlink ``<path>/<alias>`` to the collection's
folder (see ``_edge_folders``), swapped atomically, so ``EdgeShard.load(path / alias)`` opens
the live version. A shard remembers the path it was opened by and re-resolves files through
it later (a flush after a swap looks for its segments in the new target and fails), so this
sink opens every shard by its own folder, and a long-lived reader should open
``os.path.realpath(path / alias)`` and reopen to follow a swap. Only one process at a time can
open a shard (a second ``load``, even read-only, fails on the WAL lock), so other processes
can read a collection this sink has open only after it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from .._blocking import BlockingLane
from ..errors import PermanentError, SinkError
from ..model import Condition, PayloadUpdate, Point, SinkRecord, SparseVector
from . import _edge_folders as folders
from ._aliases import check_drop, check_rename, check_set_alias
from .base import (
    HYBRID_CANDIDATES,
    CollectionSpec,
    Hit,
    VectorSpec,
    extra_vectors,
    join_vectors,
    named_vectors,
    same_updates,
)

__all__ = ["QdrantEdgeSink"]

_LOCK = ".vectorsync.lock"
_MIB = 1 << 20


@contextlib.contextmanager
def wrap_errors(what: str) -> Iterator[None]:
    try:
        yield
    except (PermanentError, SinkError):
        raise
    except Exception as exc:  # qdrant-edge raises plain Exception for every failure
        raise SinkError(f"qdrant-edge: {what}: {exc}") from exc


class QdrantEdgeSink:
    def __init__(self, name: str, path: Path, *, min_free_space: int = 256) -> None:
        self.name = name
        self.path = path
        self.min_free_space = min_free_space  # MiB; 0 disables the check
        self._lane = BlockingLane(f"qdrant-edge-{name}")
        self._shards: dict[str, Any] = {}
        self._specs: dict[str, CollectionSpec] = {}
        self._lock: IO[str] | None = None

    async def open(self) -> None:
        await self._lane.run(self._take_lock)

    def _take_lock(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        lock = (self.path / _LOCK).open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise PermanentError(
                f"sink {self.name!r}: {str(self.path)!r} is in use by another process "
                f"(pid {holder}); a qdrant-edge folder has one writer: stop it or use another path"
            ) from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock = lock
        folders.sweep(self.path)

    async def problems(self) -> list[str]:
        # off the lane: a readiness probe must not wait behind a long write
        low = await asyncio.to_thread(self._low_space)
        return [low] if low else []

    def _low_space(self) -> str | None:
        """Why there is no room for a write under the folder, or None."""
        if self.min_free_space <= 0:
            return None
        folder = self.path
        while not folder.exists() and folder != folder.parent:  # not created yet
            folder = folder.parent
        try:
            st = os.statvfs(folder)
        except OSError as exc:
            return f"sink {self.name!r}: cannot read the free space under {str(folder)!r}: {exc}"
        free = st.f_bavail * st.f_frsize
        if free >= self.min_free_space * _MIB:
            return None
        return (
            f"sink {self.name!r}: only {free / _MIB:.1f} MiB free under {str(self.path)!r} "
            f"(need {self.min_free_space} MiB: sinks.{self.name}.min_free_space); "
            "free space or lower min_free_space"
        )

    def _check_room(self) -> None:
        low = self._low_space()
        if low is not None:
            raise SinkError(low, code="ENOSPC")

    async def close(self) -> None:
        try:
            await self._lane.run(self._close_all)
        finally:
            self._lane.shutdown()

    def _close_all(self) -> None:
        unflushed = []
        for name, shard in self._shards.items():
            try:
                shard.flush()
            except Exception as exc:  # ENOSPC, say: closing still works, the WAL has it all
                unflushed.append(f"{name!r} ({exc})")
            shard.close()
        self._shards.clear()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if unflushed:
            raise SinkError(
                f"sink {self.name!r}: cannot flush {', '.join(unflushed)}; its write-ahead log "
                "keeps every write and the next open replays it"
            )

    def _layout(self, collection: str) -> tuple[VectorSpec, ...]:
        """The named vectors of a collection's points (empty: one unnamed vector)."""
        spec = self._specs.get(collection)
        if spec is None:
            spec = self._specs.get(folders.link_target(self.path, collection) or "")
        return spec.vectors if spec is not None else ()

    def _shard(self, collection: str) -> Any:
        """The open shard of a collection, or of the collection an alias names."""
        try:
            return self._shards[collection]
        except KeyError:
            target = folders.link_target(self.path, collection)
            if target in self._shards:
                return self._shards[target]
            raise PermanentError(
                f"sink {self.name!r}: collection {collection!r} was not opened"
            ) from None

    # -- housekeeping -------------------------------------------------------------------
    async def maintain(self, collection: str) -> list[str]:
        """``optimize()``: nothing is HNSW-indexed before it (searches are exact), and it
        merges the segments that writes left behind. Blocks the sink while it runs."""
        return await self._lane.run(self._optimize, collection)

    def _optimize(self, collection: str) -> list[str]:
        shard = self._shard(collection)
        with wrap_errors(f"optimize {collection!r}"):
            changed = shard.optimize()
            shard.flush()
        return [f"optimize(): segments of {collection!r} merged and indexed"] if changed else []

    async def collection_size(self, collection: str) -> int | None:
        return await self._lane.run(self._size, collection)

    def _size(self, collection: str) -> int:
        folder = self.path / (folders.link_target(self.path, collection) or collection)
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())

    async def ensure_collection(self, spec: CollectionSpec) -> None:
        await self._lane.run(self._ensure, spec)

    def _ensure(self, spec: CollectionSpec) -> None:
        import qdrant_edge as qe

        distances = {
            "cosine": qe.Distance.Cosine,
            "dot": qe.Distance.Dot,
            "euclid": qe.Distance.Euclid,
        }
        vectors: Any = qe.EdgeVectorParams(size=spec.dimension, distance=distances[spec.distance])
        sparse: dict[str, Any] | None = None
        if spec.vectors:
            vectors = {
                v.name: qe.EdgeVectorParams(size=v.dimension, distance=distances[v.distance])
                for v in spec.vectors
                if not v.sparse
            }
            sparse = {
                v.name: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)
                for v in spec.vectors
                if v.sparse
            } or None
        config = qe.EdgeConfig(vectors=vectors, sparse_vectors=sparse)
        spec = self._through_alias(spec)
        folder = self.path / spec.name
        known = self._specs.get(spec.name)
        if known is not None and (known.dimension, known.distance, known.vectors) != (
            spec.dimension,
            spec.distance,
            spec.vectors,
        ):
            raise PermanentError(
                f"sink {self.name!r}: collection {spec.name!r} is open with dimension "
                f"{known.dimension} and {known.distance} distance, not {spec.dimension} and "
                f"{spec.distance}; use another collection name"
            )
        if spec.name not in self._shards:
            self._check_room()  # loading writes too: it fills sparse files in
            try:
                if (folder / "wal").exists():
                    shard = qe.EdgeShard.load(str(folder), config)
                else:
                    shard = qe.EdgeShard.create(str(folder), config)
            except Exception as exc:
                raise PermanentError(
                    f"sink {self.name!r}: cannot open collection {spec.name!r} at {str(folder)!r} "
                    f"with dimension {spec.dimension} and {spec.distance} distance: {exc}. "
                    "If the embedder changed, use a new collection name or remove the folder"
                ) from exc
            self._shards[spec.name] = shard
            self._specs[spec.name] = spec
        shard = self._shards[spec.name]
        schema_types = payload_schema_types()
        existing = shard.info().payload_schema
        missing = {f: kind for f, kind in spec.indexes.items() if f not in existing}
        if missing:
            self._check_room()
        with wrap_errors(f"index {spec.name!r}"):
            for field, kind in missing.items():
                shard.update(qe.UpdateOperation.create_field_index(field, schema_types[kind]))

    def _through_alias(self, spec: CollectionSpec) -> CollectionSpec:
        """The spec of the collection ``spec.name`` names if it is an alias: the shard is
        opened (and cached) by its own folder, never through the link."""
        target = folders.link_target(self.path, spec.name)
        if target is None:
            return spec
        if target not in folders.physical(self.path):
            raise PermanentError(
                f"sink {self.name!r}: alias {spec.name!r} names {target!r}, which is missing; "
                f"point it at a collection with set_alias or remove the link {spec.name!r}"
            )
        return dataclasses.replace(spec, name=target)

    async def upsert(self, collection: str, points: Sequence[Point]) -> None:
        await self._lane.run(self._upsert, collection, points)

    def _upsert(self, collection: str, points: Sequence[Point]) -> None:
        import qdrant_edge as qe

        layout = self._layout(collection)
        if layout:
            batch = [qe.Point(p.id, named_vectors(layout, p, _sparse), p.payload) for p in points]
        else:
            batch = [qe.Point(p.id, p.vector, p.payload) for p in points]
        self._check_room()
        with wrap_errors(f"upsert into {collection!r}"):
            self._shard(collection).update(qe.UpdateOperation.upsert_points(batch))

    async def update_payloads(self, collection: str, updates: Sequence[PayloadUpdate]) -> list[str]:
        return await self._lane.run(self._update_payloads, collection, updates)

    def _update_payloads(self, collection: str, updates: Sequence[PayloadUpdate]) -> list[str]:
        # qdrant-edge has no batched per-point payload update: one call per distinct change
        # (updates that set the same values share one call, see same_updates). Sending only
        # the changed fields halves a call's cost (~15 µs vs ~32 µs for a whole payload with
        # indexes). Each call releases and re-takes the GIL, so it slows while other Python
        # threads are busy; reading vectors back for one batched upsert measured slower still.
        import qdrant_edge as qe

        shard = self._shard(collection)
        op = qe.UpdateOperation
        self._check_room()
        with wrap_errors(f"update payloads in {collection!r}"):
            ids: list[Any] = [u.id for u in updates]
            found = {str(r.id) for r in shard.retrieve(ids, with_payload=False, with_vector=False)}
            present = [u for u in updates if u.id in found]
            nulls = [u for u in present if any(v is None for v in u.set.values())]
            for u in nulls:  # set_payload drops null values instead of storing them
                shard.update(op.overwrite_payload([u.id], u.payload))
            rest = [u for u in present if not any(v is None for v in u.set.values())]
            for group, changed, unset in same_updates(rest):
                points: list[Any] = list(group)
                if changed:
                    shard.update(op.set_payload(points, changed))
                if unset:
                    shard.update(op.delete_payload(points, list(unset)))
        return [u.id for u in updates if u.id not in found]

    async def delete(self, collection: str, ids: Sequence[str]) -> None:
        await self._lane.run(self._delete, collection, list(ids))

    def _delete(self, collection: str, ids: list[Any]) -> None:
        import qdrant_edge as qe

        self._check_room()  # a delete appends to the WAL and marks segment pages
        with wrap_errors(f"delete from {collection!r}"):
            self._shard(collection).update(qe.UpdateOperation.delete_points(ids))

    async def retrieve(
        self, collection: str, ids: Sequence[str], *, with_vectors: bool = False
    ) -> list[SinkRecord]:
        return await self._lane.run(self._retrieve, collection, list(ids), with_vectors)

    def _retrieve(self, collection: str, ids: list[str], with_vectors: bool) -> list[SinkRecord]:
        with wrap_errors(f"retrieve from {collection!r}"):
            records = self._shard(collection).retrieve(
                ids, with_payload=True, with_vector=with_vectors
            )
        layout = self._layout(collection)
        return [_record(r, with_vectors, layout) for r in records]

    async def scroll(
        self,
        collection: str,
        *,
        with_vectors: bool = False,
        with_payload: bool = True,
        page: int = 1000,
    ) -> AsyncIterator[SinkRecord]:
        offset: Any = None
        while True:
            records, offset = await self._lane.run(
                self._scroll_page, collection, offset, page, with_vectors, with_payload
            )
            for r in records:
                yield r
            if offset is None:
                return

    def _scroll_page(
        self, collection: str, offset: Any, page: int, with_vectors: bool, with_payload: bool
    ) -> tuple[list[SinkRecord], Any]:
        import qdrant_edge as qe

        request = qe.ScrollRequest(
            offset=offset, limit=page, with_payload=with_payload, with_vector=with_vectors
        )
        with wrap_errors(f"scroll {collection!r}"):
            records, next_offset = self._shard(collection).scroll(request)
        layout = self._layout(collection)
        return [_record(r, with_vectors, layout) for r in records], next_offset

    async def scroll_payloads(
        self, collection: str, fields: Sequence[str], *, page: int = 5000
    ) -> AsyncIterator[list[tuple[str, Mapping[str, Any]]]]:
        """(id, payload) pairs a page at a time: no record objects, no copies. Whole
        payloads: qdrant-edge 0.9 reads a payload selection slower than all of it (1M
        points: 8.1 s for 6 of 8 fields, 10.7 s for one, 6.5 s for all)."""
        await self._lane.run(self._read_ahead, collection)
        offset: Any = None
        while True:
            pairs, offset = await self._lane.run(self._payload_page, collection, offset, page)
            if pairs:
                yield pairs
            if offset is None:
                return

    def _read_ahead(self, collection: str) -> None:
        """Read a collection's payload files once, in file order, into the page cache when
        they fit in half the memory available: a scroll reads payloads in id order, at
        random places of those files, and from a cold cache that is most of its time (1M
        points: 9.4 s cold, 4.2 s after 260 MB read ahead in 0.6 s). A hint: a file that
        cannot be read is skipped, and the scroll reads what it needs itself."""
        name = folders.link_target(self.path, collection) or collection
        files = sorted((self.path / name / "segments").glob("*/payload_storage/*"))
        sizes = 0
        for file in files:
            with contextlib.suppress(OSError):
                sizes += file.stat().st_size
        if sizes > os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2:
            return
        buffer = bytearray(_MIB)
        for file in files:
            with contextlib.suppress(OSError), file.open("rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass

    def _payload_page(
        self, collection: str, offset: Any, page: int
    ) -> tuple[list[tuple[str, Mapping[str, Any]]], Any]:
        import qdrant_edge as qe

        request = qe.ScrollRequest(offset=offset, limit=page, with_payload=True, with_vector=False)
        with wrap_errors(f"scroll {collection!r}"):
            records, next_offset = self._shard(collection).scroll(request)
        return [(str(r.id), r.payload or {}) for r in records], next_offset

    async def count(self, collection: str) -> int:
        return await self._lane.run(self._count, collection)

    def _count(self, collection: str) -> int:
        import qdrant_edge as qe

        with wrap_errors(f"count {collection!r}"):
            return int(self._shard(collection).count(qe.CountRequest(exact=True)))

    async def search(
        self,
        collection: str,
        vector: Sequence[float],
        limit: int = 5,
        where: Sequence[Condition] = (),
    ) -> list[Hit]:
        return await self._lane.run(
            self._search, collection, None, list(vector), limit, list(where)
        )

    async def search_vector(
        self,
        collection: str,
        name: str,
        vector: Sequence[float] | SparseVector,
        limit: int = 5,
        where: Sequence[Condition] = (),
    ) -> list[Hit]:
        query = vector if isinstance(vector, SparseVector) else list(vector)
        return await self._lane.run(self._search, collection, name, query, limit, list(where))

    async def search_hybrid(
        self,
        collection: str,
        dense: tuple[str, Sequence[float]],
        sparse: tuple[str, SparseVector],
        limit: int = 5,
        where: Sequence[Condition] = (),
    ) -> list[Hit]:
        import qdrant_edge as qe

        found = _filter(where) if where else None
        candidates = limit * HYBRID_CANDIDATES
        prefetches = [
            qe.Prefetch(
                limit=candidates,
                query=qe.Query.Nearest(list(dense[1]), using=dense[0]),
                filter=found,
            ),
            qe.Prefetch(
                limit=candidates,
                query=qe.Query.Nearest(_sparse(sparse[1]), using=sparse[0]),
                filter=found,
            ),
        ]
        fusion: Any = qe.Fusion.Rrf(k=60)  # (the stubs type Rrf apart from Fusion)
        request = qe.QueryRequest(
            limit=limit, prefetches=prefetches, query=fusion, with_payload=True
        )
        return await self._lane.run(self._query, collection, request)

    def _search(
        self,
        collection: str,
        using: str | None,
        vector: list[float] | SparseVector,
        limit: int,
        where: list[Condition],
    ) -> list[Hit]:
        import qdrant_edge as qe

        layout = self._layout(collection)
        if using is None and layout:
            using = layout[0].name  # the first named vector is the default
        query = _sparse(vector) if isinstance(vector, SparseVector) else vector
        request = qe.QueryRequest(
            limit=limit,
            query=qe.Query.Nearest(query, using=using),
            with_payload=True,
            filter=_filter(where) if where else None,
        )
        return self._query(collection, request)

    def _query(self, collection: str, request: Any) -> list[Hit]:
        with wrap_errors(f"search {collection!r}"):
            scored = self._shard(collection).query(request)
        return [Hit(float(s.score), _record(s, False, ())) for s in scored]

    async def set_alias(self, alias: str, collection: str) -> None:
        await self._lane.run(self._set_alias, alias, collection)

    def _set_alias(self, alias: str, collection: str) -> None:
        self._require_open()
        folders.check_plain(self.name, alias)
        check_set_alias(
            self.name, alias, collection, folders.physical(self.path), folders.links(self.path)
        )
        with wrap_errors(f"point alias {alias!r} at {collection!r}"):
            folders.swap_link(self.path, alias, collection)

    async def alias_target(self, alias: str) -> str | None:
        return await self._lane.run(folders.link_target, self.path, alias)

    async def is_alias(self, name: str) -> bool:
        return await self.alias_target(name) is not None

    async def rename_collection(self, old: str, new: str) -> None:
        await self._lane.run(self._rename, old, new)

    def _rename(self, old: str, new: str) -> None:
        self._require_open()
        for name in (old, new):
            folders.check_plain(self.name, name)
        check_rename(self.name, old, new, folders.physical(self.path), folders.links(self.path))
        spec = self._specs.get(old)
        if old in self._shards:  # a shard keeps its path: close it, move it, reopen it
            with wrap_errors(f"close {old!r} to rename it"):
                self._shards[old].flush()
                self._shards.pop(old).close()
            del self._specs[old]
        with wrap_errors(f"rename {old!r} to {new!r}"):
            folders.rename(self.path, old, new)
        if spec is not None:
            self._ensure(dataclasses.replace(spec, name=new))

    async def drop_collection(self, name: str) -> None:
        await self._lane.run(self._drop, name)

    def _drop(self, name: str) -> None:
        self._require_open()
        folders.check_plain(self.name, name)  # never rmtree a path outside the folder
        check_drop(self.name, name, folders.links(self.path))
        self._specs.pop(name, None)
        with wrap_errors(f"drop collection {name!r}"):
            if name in self._shards:
                self._shards.pop(name).close()
            folders.remove(self.path, name)

    async def collections(self) -> list[str]:
        return sorted(await self._lane.run(folders.physical, self.path))

    def _require_open(self) -> None:
        if self._lock is None:  # only the lock holder may change the folder
            raise RuntimeError(f"sink {self.name!r} is not open")


def payload_schema_types() -> dict[str, Any]:
    """qdrant-edge's payload index type for each of our index types."""
    import qdrant_edge as qe

    return {
        "keyword": qe.PayloadSchemaType.Keyword,
        "integer": qe.PayloadSchemaType.Integer,
        "float": qe.PayloadSchemaType.Float,
        "bool": qe.PayloadSchemaType.Bool,
        "datetime": qe.PayloadSchemaType.Datetime,
        "text": qe.PayloadSchemaType.Text,
    }


def _filter(where: Sequence[Condition]) -> Any:
    """Conditions as a qdrant-edge filter (the same shape as Qdrant's own)."""
    import qdrant_edge as qe

    must: list[Any] = []
    must_not: list[Any] = []
    for c in where:
        if c.op in ("eq", "ne"):
            condition = qe.FieldCondition(key=c.field, match=qe.MatchValue(c.value))
            (must if c.op == "eq" else must_not).append(condition)
        else:
            bound = {c.op: c.value}
            must.append(qe.FieldCondition(key=c.field, range=qe.RangeFloat(**bound)))
    return qe.Filter(must=must or None, must_not=must_not or None)


def _sparse(v: SparseVector) -> Any:
    import qdrant_edge as qe

    return qe.SparseVector(v.indices, v.values)


def _record(r: Any, with_vectors: bool, layout: tuple[VectorSpec, ...]) -> SinkRecord:
    vector = None
    extra: dict[str, list[float]] = {}
    if with_vectors and r.vector is not None:
        vector = join_vectors(layout, r.vector) if layout else list(r.vector)
        extra = extra_vectors(layout, r.vector) if layout else {}
    return SinkRecord(id=str(r.id), payload=dict(r.payload or {}), vector=vector, extra=extra)
