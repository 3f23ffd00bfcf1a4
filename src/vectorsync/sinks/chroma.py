"""Chroma sink: embedded (``path``, chromadb's PersistentClient) or a server (``url``).

We supply every vector (``embedding_function=None``) and telemetry is off. Chroma's client
is synchronous, so its calls run on one thread of their own, off the event loop.

* Distance: cosine, dot and euclid are Chroma's ``cosine``, ``ip`` and ``l2`` spaces.
  Scores follow Qdrant's: cosine similarity (vectors are stored normalised), the dot
  product, and the euclidean distance (Chroma's ``l2`` is its square; nearest first).
* Payloads become metadata as :mod:`._chroma_values` describes (lists of one scalar type as
  lists, anything else JSON under its key). Chroma indexes every metadata key by itself,
  so a collection's payload indexes need no call.
* Writes: ``add`` ignores an id that exists and ``upsert`` of an existing id re-writes its
  vector 5 to 10 times slower than delete + add, so existing ids are deleted and every point added.
  Between the two a reader misses those points; a crash between them loses them until the
  journaled batch is replayed (the worker journals each batch before it is sent).
  ``update`` merges metadata keys, so a payload update sets each removed field to None.
* Aliases: Chroma has none. Ours are records of the collection ``vectorsync-aliases``
  (id = alias, metadata ``{"collection": <physical name>}``); one record write swaps an
  alias, so a reader sees the old target or the new. Every call of this sink resolves a
  name that is not a collection it opened through that record; a reader with Chroma's own
  client does the same with :func:`live_collection`, and follows a swap by resolving
  again (per query, or when the collection it holds is dropped). Renames are Chroma's own
  ``modify(name=...)``, which keeps the points.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .._blocking import BlockingLane
from ..errors import PermanentError, SinkError
from ..model import Condition, PayloadUpdate, Point, SinkRecord
from ._aliases import check_drop, check_rename, check_set_alias
from ._chroma_values import from_metadata, to_metadata, where_filter
from .base import CollectionSpec, Distance, Hit

if TYPE_CHECKING:
    from chromadb.api import ClientAPI
    from chromadb.api.models.Collection import Collection

__all__ = ["ALIASES", "ChromaSink", "check_collection_name", "live_collection"]

ALIASES = "vectorsync-aliases"  # the collection whose records are our aliases
_SPACES: dict[Distance, str] = {"cosine": "cosine", "dot": "ip", "euclid": "l2"}
_DIMENSION, _DISTANCE = "_vs_dimension", "_vs_distance"  # collection metadata we keep


@contextlib.contextmanager
def wrap_errors(what: str) -> Iterator[None]:
    import httpx
    from chromadb import errors

    try:
        yield
    except (PermanentError, SinkError):
        raise
    except (errors.InvalidArgumentError, errors.NotFoundError, errors.DuplicateIDError) as exc:
        raise PermanentError(f"chroma: {what}: {exc}") from exc
    except (httpx.TransportError, ConnectionError, TimeoutError) as exc:
        raise SinkError(f"chroma: {what}: {exc}") from exc
    except ValueError as exc:  # the client validates and raises ValueError
        raise PermanentError(f"chroma: {what}: {exc}") from exc
    except Exception as exc:  # an internal or server error: a later try may succeed
        raise SinkError(f"chroma: {what}: {exc}") from exc


def check_collection_name(name: str) -> str | None:
    """Why Chroma cannot name a collection ``name``, or None."""
    if name == ALIASES:
        return f"{ALIASES!r} keeps vectorsync's aliases"
    ok = 3 <= len(name) <= 512 and name[0].isalnum() and name[-1].isalnum()
    if not ok or not all(ch.isalnum() or ch in "._-" for ch in name) or not name.isascii():
        return "Chroma needs 3-512 of a-z A-Z 0-9 . _ -, starting and ending with a letter or digit"
    if ".." in name:
        return "Chroma refuses two periods in a row"
    return None


def live_collection(client: ClientAPI, name: str) -> Collection:
    """The Chroma collection ``name`` names now: the one an alias of ours points at, else
    the collection of that name. For readers with their own client; call it again to
    follow a swap."""
    from chromadb.errors import NotFoundError

    with contextlib.suppress(NotFoundError):
        found = client.get_collection(ALIASES).get(ids=[name], include=["metadatas"])
        if found["ids"] and found["metadatas"] and found["metadatas"][0]:
            name = str(found["metadatas"][0]["collection"])
    return client.get_collection(name, embedding_function=None)


class ChromaSink:
    def __init__(
        self, name: str, *, path: Path | None = None, url: str | None = None, timeout: float = 30.0
    ) -> None:
        if (path is None) == (url is None):
            raise ValueError("set exactly one of path and url")
        self.name = name
        self.path, self.url, self.timeout = path, url, timeout
        self._lane = BlockingLane(f"chroma-{name}")
        self._client: ClientAPI | None = None
        self._cols: dict[str, Collection] = {}  # physical name -> collection
        self._aliases: Collection | None = None
        self._distances: dict[str, Distance] = {}
        self._batch = 1000

    # -- lifecycle ------------------------------------------------------------------------
    async def open(self) -> None:
        if self.path is not None:  # a server may be down now: connect on first use
            await self._lane.run(self._connect)

    def _connect(self) -> ClientAPI:
        if self._client is not None:
            return self._client
        import chromadb
        from chromadb.config import Settings

        settings = Settings(anonymized_telemetry=False)
        if self.path is not None:
            with wrap_errors(f"open {str(self.path)!r}"):
                self.path.mkdir(parents=True, exist_ok=True)
                client = chromadb.PersistentClient(path=str(self.path), settings=settings)
        else:
            client = self._http_client(settings)
        self._batch = max(1, min(client.get_max_batch_size(), 5000))
        self._client = client
        return client

    def _http_client(self, settings: Any) -> ClientAPI:
        import chromadb
        import httpx

        assert self.url is not None
        parts = urlsplit(self.url)
        # chromadb connects when the client is made and, if the server is down, leaves
        # its HTTP session open: ask first, with a session we close
        try:
            with httpx.Client(timeout=self.timeout) as probe:
                probe.get(f"{self.url.rstrip('/')}/api/v2/heartbeat").raise_for_status()
        except httpx.HTTPError as exc:
            raise SinkError(
                f"sink {self.name!r}: no Chroma server answers at {self.url} ({exc}); "
                "start it (chroma run --path DIR --port P) or fix sinks."
                f"{self.name}.url"
            ) from exc
        try:
            client = chromadb.HttpClient(
                host=parts.hostname or "localhost",
                port=parts.port or (443 if parts.scheme == "https" else 8000),
                ssl=parts.scheme == "https",
                settings=settings,
            )
        except Exception as exc:  # it says ValueError when the server went away meanwhile
            raise SinkError(f"sink {self.name!r}: cannot connect to {self.url}: {exc}") from exc
        for session in _sessions(client):  # chromadb's sessions wait forever; ours not
            session.timeout = httpx.Timeout(self.timeout)
        return client

    async def close(self) -> None:
        try:
            await self._lane.run(self._close)
        finally:
            self._lane.shutdown()

    def _close(self) -> None:
        client, self._client = self._client, None
        self._cols.clear()
        self._aliases = None
        if client is None:
            return
        # an HTTP client's systems are its own (chromadb gives each a fresh identifier),
        # but stopping them leaves their HTTP sessions open: close those too
        sessions = _sessions(client) if self.url is not None else []
        client.close()  # type: ignore[attr-defined]  # Client has it, ClientAPI does not
        for session in sessions:
            session.close()

    async def problems(self) -> list[str]:
        if self.url is None:
            return []  # embedded: a full disk is an error a write returns (and is retried)
        import httpx

        # off the lane: a readiness probe must not wait behind a long write
        try:
            async with httpx.AsyncClient(timeout=min(self.timeout, 5.0)) as http:
                (await http.get(f"{self.url.rstrip('/')}/api/v2/heartbeat")).raise_for_status()
        except httpx.HTTPError as exc:
            return [
                f"sink {self.name!r}: no Chroma server answers at {self.url} ({exc}); start "
                f"it or fix sinks.{self.name}.url"
            ]
        return []

    # -- collections ----------------------------------------------------------------------
    def _collection(self, name: str) -> Collection:
        """The collection ``name`` names: one this sink opened, else through an alias."""
        if name in self._cols:
            return self._cols[name]
        target = self._alias_of(name) or name
        if target in self._cols:
            return self._cols[target]
        from chromadb.errors import NotFoundError

        with wrap_errors(f"open collection {target!r}"):
            try:
                col = self._connect().get_collection(target, embedding_function=None)
            except NotFoundError:
                via = f" (named by alias {name!r})" if target != name else ""
                raise PermanentError(
                    f"sink {self.name!r}: Chroma has no collection {target!r}{via}; create it "
                    "with setup (or the first run)"
                ) from None
        self._cols[target] = col
        return col

    def _distance(self, col: Collection) -> Distance:
        if col.name not in self._distances:
            self._distances[col.name] = _distance_of(col)
        return self._distances[col.name]

    async def ensure_collection(self, spec: CollectionSpec) -> None:
        await self._lane.run(self._ensure, spec)

    def _ensure(self, spec: CollectionSpec) -> None:
        from chromadb.errors import NotFoundError

        target = self._alias_of(spec.name) or spec.name
        if (why := check_collection_name(target)) is not None:
            raise PermanentError(
                f"sink {self.name!r}: cannot make collection {target!r}: {why}; set the "
                "mapping's collection to another name"
            )
        client = self._connect()
        with wrap_errors(f"open collection {target!r}"):
            try:
                col = client.get_collection(target, embedding_function=None)
            except NotFoundError:
                if target != spec.name:
                    raise PermanentError(
                        f"sink {self.name!r}: alias {spec.name!r} names {target!r}, which is "
                        "missing; point it at a collection with set_alias"
                    ) from None
                col = client.create_collection(
                    target,
                    embedding_function=None,
                    configuration={"hnsw": {"space": _SPACES[spec.distance]}},  # type: ignore[arg-type]
                    metadata={_DIMENSION: spec.dimension, _DISTANCE: spec.distance},
                )
        dimension, distance = _dimension_of(col), _distance_of(col)
        if distance != spec.distance or dimension not in (None, spec.dimension):
            raise PermanentError(
                f"sink {self.name!r}: collection {target!r} exists with dimension {dimension} "
                f"and {distance} distance, not {spec.dimension} and {spec.distance}; use "
                "another collection name"
            )
        self._cols[target] = col
        self._distances[target] = distance

    # -- writes ---------------------------------------------------------------------------
    async def upsert(self, collection: str, points: Sequence[Point]) -> None:
        await self._lane.run(self._upsert, collection, points)

    def _upsert(self, collection: str, points: Sequence[Point]) -> None:
        import numpy as np

        col = self._collection(collection)
        latest = list({p.id: p for p in points}.values())  # add refuses an id twice
        if not latest:
            return
        dimension = _dimension_of(col) or len(latest[0].vector)
        for p in latest:  # everything is checked before anything is deleted
            if len(p.vector) != dimension:
                raise PermanentError(
                    f"sink {self.name!r}: point {p.id} has a vector of dimension "
                    f"{len(p.vector)}; collection {col.name!r} holds dimension {dimension}"
                )
        metas = [to_metadata(self.name, p.id, p.payload) for p in latest]
        vectors = np.asarray([p.vector for p in latest], dtype=np.float32)
        if not (finite := np.isfinite(vectors).all(axis=1)).all():
            bad = latest[int(np.argmin(finite))].id
            raise PermanentError(
                f"sink {self.name!r}: point {bad} has a vector with NaN or infinity, which "
                "Chroma refuses"
            )
        if self._distance(col) == "cosine":  # stored normalised, as Qdrant does
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors /= np.where(norms == 0, 1, norms)
        for i in range(0, len(latest), self._batch):
            ids = [p.id for p in latest[i : i + self._batch]]
            with wrap_errors(f"upsert into {collection!r}"):
                existing = col.get(ids=ids, include=[])["ids"]
                if existing:
                    col.delete(ids=existing)
                col.add(
                    ids=ids,
                    embeddings=vectors[i : i + self._batch],
                    metadatas=metas[i : i + self._batch],  # type: ignore[arg-type]
                )

    async def update_payloads(self, collection: str, updates: Sequence[PayloadUpdate]) -> list[str]:
        return await self._lane.run(self._update_payloads, collection, updates)

    def _update_payloads(self, collection: str, updates: Sequence[PayloadUpdate]) -> list[str]:
        col = self._collection(collection)
        missing: list[str] = []
        for i in range(0, len(updates), self._batch):
            chunk = updates[i : i + self._batch]
            with wrap_errors(f"read payloads in {collection!r}"):
                got = col.get(ids=[u.id for u in chunk], include=["metadatas"])
            old = dict(zip(got["ids"], got["metadatas"] or [], strict=False))
            ids, metas = [], []
            for u in chunk:
                if u.id not in old:
                    missing.append(u.id)
                    continue
                before = old[u.id] or {}
                payload = u.payload or _merged(from_metadata(before), u)
                meta: dict[str, Any] = to_metadata(self.name, u.id, payload) or {}
                meta.update({k: None for k in before if k not in meta})  # update merges keys
                if meta:
                    ids.append(u.id)
                    metas.append(meta)
            if ids:
                with wrap_errors(f"update payloads in {collection!r}"):
                    col.update(ids=ids, metadatas=metas)  # type: ignore[arg-type]
        return missing

    async def delete(self, collection: str, ids: Sequence[str]) -> None:
        await self._lane.run(self._delete, collection, list(ids))

    def _delete(self, collection: str, ids: list[str]) -> None:
        col = self._collection(collection)
        for i in range(0, len(ids), self._batch):
            with wrap_errors(f"delete from {collection!r}"):
                col.delete(ids=ids[i : i + self._batch])

    # -- reads ----------------------------------------------------------------------------
    async def retrieve(
        self, collection: str, ids: Sequence[str], *, with_vectors: bool = False
    ) -> list[SinkRecord]:
        return await self._lane.run(self._retrieve, collection, list(ids), with_vectors)

    def _retrieve(self, collection: str, ids: list[str], with_vectors: bool) -> list[SinkRecord]:
        col = self._collection(collection)
        found: dict[str, SinkRecord] = {}
        for i in range(0, len(ids), self._batch):
            with wrap_errors(f"retrieve from {collection!r}"):
                got = col.get(ids=ids[i : i + self._batch], include=_include(True, with_vectors))
            found.update((r.id, r) for r in _records(got))
        return [found[pid] for pid in dict.fromkeys(ids) if pid in found]

    async def scroll(
        self,
        collection: str,
        *,
        with_vectors: bool = False,
        with_payload: bool = True,
        page: int = 1000,
    ) -> AsyncIterator[SinkRecord]:
        # Chroma pages by offset: a write between two pages can shift what the next holds
        offset = 0
        while True:
            records = await self._lane.run(
                self._scroll_page, collection, offset, page, with_vectors, with_payload
            )
            for r in records:
                yield r
            if len(records) < page:
                return
            offset += len(records)

    def _scroll_page(
        self, collection: str, offset: int, page: int, with_vectors: bool, with_payload: bool
    ) -> list[SinkRecord]:
        col = self._collection(collection)
        with wrap_errors(f"scroll {collection!r}"):
            got = col.get(
                limit=min(page, self._batch),
                offset=offset,
                include=_include(with_payload, with_vectors),
            )
        return _records(got)

    async def count(self, collection: str) -> int:
        return await self._lane.run(self._count, collection)

    def _count(self, collection: str) -> int:
        col = self._collection(collection)
        with wrap_errors(f"count {collection!r}"):
            return col.count()

    async def search(
        self,
        collection: str,
        vector: Sequence[float],
        limit: int = 5,
        where: Sequence[Condition] = (),
    ) -> list[Hit]:
        return await self._lane.run(self._search, collection, list(vector), limit, list(where))

    def _search(
        self, collection: str, vector: list[float], limit: int, where: list[Condition]
    ) -> list[Hit]:
        import numpy as np

        col = self._collection(collection)
        distance = self._distance(col)
        with wrap_errors(f"search {collection!r}"):
            got = col.query(
                query_embeddings=np.asarray([vector], dtype=np.float32),
                n_results=max(1, limit),
                where=where_filter(self.name, where),
                include=["metadatas", "distances"],
            )
        ids = got["ids"][0]
        metas = (got["metadatas"] or [[]])[0]
        dists = (got["distances"] or [[]])[0]
        return [
            Hit(_score(distance, float(d)), SinkRecord(id=pid, payload=from_metadata(m)))
            for pid, m, d in zip(ids, metas, dists, strict=True)
        ][:limit]

    # -- aliases --------------------------------------------------------------------------
    def _alias_collection(self, *, create: bool) -> Collection | None:
        """The collection of aliases (kept once found: vectorsync never drops it)."""
        from chromadb.errors import NotFoundError

        if self._aliases is not None:
            return self._aliases
        client = self._connect()
        with wrap_errors("open the aliases"):
            try:
                self._aliases = client.get_collection(ALIASES, embedding_function=None)
            except NotFoundError:
                if create:
                    self._aliases = client.get_or_create_collection(
                        ALIASES, embedding_function=None
                    )
        return self._aliases

    def _alias_of(self, name: str) -> str | None:
        """The collection alias ``name`` names now, or None (one record read)."""
        col = self._alias_collection(create=False)
        if col is None:
            return None
        with wrap_errors(f"resolve {name!r}"):
            got = col.get(ids=[name], include=["metadatas"])
        metas = got["metadatas"] or []
        return str(metas[0]["collection"]) if got["ids"] and metas and metas[0] else None

    def _aliases_now(self) -> dict[str, str]:
        col = self._alias_collection(create=False)
        if col is None:
            return {}
        with wrap_errors("read the aliases"):
            got = col.get(include=["metadatas"])
        metas = got["metadatas"] or []
        return {a: str(m["collection"]) for a, m in zip(got["ids"], metas, strict=True) if m}

    def _physical(self) -> set[str]:
        with wrap_errors("list collections"):
            return {c.name for c in self._connect().list_collections()} - {ALIASES}

    async def set_alias(self, alias: str, collection: str) -> None:
        await self._lane.run(self._set_alias, alias, collection)

    def _set_alias(self, alias: str, collection: str) -> None:
        aliases = self._aliases_now()
        check_set_alias(self.name, alias, collection, self._physical(), aliases)
        if aliases.get(alias) == collection:
            return
        import numpy as np

        col = self._alias_collection(create=True)
        assert col is not None
        with wrap_errors(f"point alias {alias!r} at {collection!r}"):
            # one record: a reader sees the old target or the new one
            col.upsert(
                ids=[alias],
                embeddings=np.zeros((1, 1), dtype=np.float32),
                metadatas=[{"collection": collection}],
            )

    async def alias_target(self, alias: str) -> str | None:
        return (await self._lane.run(self._aliases_now)).get(alias)

    async def is_alias(self, name: str) -> bool:
        return await self.alias_target(name) is not None

    async def rename_collection(self, old: str, new: str) -> None:
        await self._lane.run(self._rename, old, new)

    def _rename(self, old: str, new: str) -> None:
        check_rename(self.name, old, new, self._physical(), self._aliases_now())
        if (why := check_collection_name(new)) is not None:
            raise PermanentError(f"sink {self.name!r}: cannot rename {old!r} to {new!r}: {why}")
        col = self._cols.pop(old, None) or self._collection(old)
        self._cols.pop(old, None)
        with wrap_errors(f"rename {old!r} to {new!r}"):
            col.modify(name=new)
        self._cols[new] = col
        if old in self._distances:
            self._distances[new] = self._distances.pop(old)

    async def drop_collection(self, name: str) -> None:
        await self._lane.run(self._drop, name)

    def _drop(self, name: str) -> None:
        from chromadb.errors import NotFoundError

        if name == ALIASES:
            raise PermanentError(f"sink {self.name!r}: {ALIASES!r} keeps the aliases; not dropped")
        check_drop(self.name, name, self._aliases_now())
        self._cols.pop(name, None)
        self._distances.pop(name, None)
        client = self._connect()
        with wrap_errors(f"drop collection {name!r}"), contextlib.suppress(NotFoundError):
            col = client.get_collection(name, embedding_function=None)
            # chromadb 1.5's delete_collection leaves list-valued metadata behind, and the
            # next records written anywhere inherit it (chroma-core/chroma#7594): delete
            # the points first, which cleans them up
            while ids := col.get(limit=self._batch, include=[])["ids"]:
                col.delete(ids=ids)
            client.delete_collection(name)

    async def collections(self) -> list[str]:
        return sorted(await self._lane.run(self._physical))


def _sessions(client: Any) -> list[Any]:
    """The HTTP sessions of a chromadb HttpClient: its own and its admin client's."""
    found: list[Any] = []
    for owner in (client, getattr(client, "_admin_client", None)):
        session = getattr(getattr(owner, "_server", None), "_session", None)
        if session is not None and all(session is not s for s in found):
            found.append(session)
    return found


def _distance_of(col: Collection) -> Distance:
    stored = (col.metadata or {}).get(_DISTANCE)
    if stored in _SPACES:
        return stored  # type: ignore[no-any-return]
    space = (col.configuration_json.get("hnsw") or {}).get("space") or "l2"  # made elsewhere
    return {v: k for k, v in _SPACES.items()}.get(space, "euclid")


def _dimension_of(col: Collection) -> int | None:
    stored = (col.metadata or {}).get(_DIMENSION)
    return int(stored) if isinstance(stored, int) else col.get_model().dimension


def _score(distance: Distance, d: float) -> float:
    """A Chroma distance as the score Qdrant gives: similarity for cosine and dot (higher
    is nearer), the euclidean distance for euclid (lower is nearer)."""
    if distance == "euclid":
        return math.sqrt(max(d, 0.0))
    return 1.0 - d


def _merged(before: dict[str, Any], u: PayloadUpdate) -> dict[str, Any]:
    kept = {k: v for k, v in before.items() if k not in u.unset}
    return {**kept, **u.set}


def _include(payload: bool, vectors: bool) -> Any:
    return [*(["metadatas"] if payload else []), *(["embeddings"] if vectors else [])]


def _records(got: Any) -> list[SinkRecord]:
    ids = got["ids"]
    metas = got["metadatas"] if got["metadatas"] is not None else [None] * len(ids)
    vectors = got["embeddings"]
    return [
        SinkRecord(
            id=pid,
            payload=from_metadata(meta),
            vector=None if vectors is None else [float(x) for x in vectors[i]],
        )
        for i, (pid, meta) in enumerate(zip(ids, metas, strict=True))
    ]
