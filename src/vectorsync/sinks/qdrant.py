"""Qdrant sink through qdrant-client: a server (``url``) or local mode (``path``/``:memory:``)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import PermanentError, SinkError, VectorsyncError
from ..model import Condition, PayloadUpdate, Point, SinkRecord, SparseVector
from ._aliases import check_drop, check_set_alias, rename_unsupported
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

if TYPE_CHECKING:
    from qdrant_client import AsyncQdrantClient

__all__ = ["QdrantSink"]


@contextlib.contextmanager
def wrap_errors(what: str) -> Iterator[None]:
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    try:
        yield
    except UnexpectedResponse as exc:
        status = exc.status_code or 0
        err: type[VectorsyncError] = SinkError if status == 429 or status >= 500 else PermanentError
        raise err(f"qdrant: {what}: HTTP {status}: {exc.content!r}", code=str(status)) from exc
    except (ResponseHandlingException, ConnectionError, TimeoutError) as exc:
        raise SinkError(f"qdrant: {what}: {exc}") from exc
    except ValueError as exc:  # local mode validates and raises ValueError
        raise PermanentError(f"qdrant: {what}: {exc}") from exc


class QdrantSink:
    def __init__(
        self,
        name: str,
        *,
        url: str | None = None,
        path: str | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.name = name
        self._url, self._path, self._api_key, self._timeout = url, path, api_key, timeout
        self._client: AsyncQdrantClient | None = None
        self._layouts: dict[str, tuple[VectorSpec, ...]] = {}  # collection or alias → layout

    async def open(self) -> None:
        from qdrant_client import AsyncQdrantClient

        if self._url is not None:
            self._client = AsyncQdrantClient(
                url=self._url, api_key=self._api_key, timeout=int(self._timeout)
            )
        elif self._path == ":memory:":
            self._client = AsyncQdrantClient(location=":memory:")
        else:
            self._client = AsyncQdrantClient(path=self._path)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def problems(self) -> list[str]:
        return []  # the server manages its own disk; an outage shows as a failed call

    @property
    def client(self) -> AsyncQdrantClient:
        if self._client is None:
            raise RuntimeError("sink is not open")
        return self._client

    async def ensure_collection(self, spec: CollectionSpec) -> None:
        from qdrant_client import models

        distances = {
            "cosine": models.Distance.COSINE,
            "dot": models.Distance.DOT,
            "euclid": models.Distance.EUCLID,
        }
        wanted: Any = models.VectorParams(size=spec.dimension, distance=distances[spec.distance])
        sparse: dict[str, Any] | None = None
        if spec.vectors:
            wanted = {
                v.name: models.VectorParams(size=v.dimension, distance=distances[v.distance])
                for v in spec.vectors
                if not v.sparse
            }
            sparse = {
                v.name: models.SparseVectorParams(modifier=models.Modifier.IDF)
                for v in spec.vectors
                if v.sparse
            } or None
        with wrap_errors(f"create collection {spec.name!r}"):
            if await self.client.collection_exists(spec.name):
                await self._check_params(spec, wanted)
            else:
                await self.client.create_collection(
                    spec.name, vectors_config=wanted, sparse_vectors_config=sparse
                )
            self._layouts[spec.name] = spec.vectors
            if self._url is None:
                return  # local mode ignores payload indexes (and warns)
            schema = (await self.client.get_collection(spec.name)).payload_schema
            for field, kind in spec.indexes.items():
                if field not in schema:
                    await self.client.create_payload_index(
                        spec.name, field, field_schema=models.PayloadSchemaType(kind)
                    )

    async def _check_params(self, spec: CollectionSpec, wanted: Any) -> None:
        params = (await self.client.get_collection(spec.name)).config.params.vectors
        if _shape(params) != _shape(wanted):
            raise PermanentError(
                f"sink {self.name!r}: collection {spec.name!r} exists with vectors {params}, "
                f"not {wanted}; use another collection name"
            )

    async def _layout(self, collection: str) -> tuple[VectorSpec, ...]:
        """The named vectors of a collection's points (empty: one unnamed vector), also
        through an alias."""
        if collection in self._layouts:  # the physical collections this sink made
            return self._layouts[collection]
        physical = (await self._aliases()).get(collection, collection)
        return self._layouts.get(physical, ())

    async def upsert(self, collection: str, points: Sequence[Point]) -> None:
        from qdrant_client import models

        layout = await self._layout(collection)
        structs = [
            models.PointStruct(
                id=p.id,
                vector=named_vectors(layout, p, _sparse) if layout else p.vector,
                payload=p.payload,
            )
            for p in points
        ]
        with wrap_errors(f"upsert into {collection!r}"):
            await self.client.upsert(collection, structs, wait=True)

    async def update_payloads(self, collection: str, updates: Sequence[PayloadUpdate]) -> list[str]:
        from qdrant_client import models

        found = {r.id for r in await self.retrieve(collection, [u.id for u in updates])}
        ops: list[models.UpdateOperation] = []
        present = [u for u in updates if u.id in found]
        rest = []
        for u in present:
            if any(v is None for v in u.set.values()):  # set_payload drops nulls
                ops.append(
                    models.OverwritePayloadOperation(
                        overwrite_payload=models.SetPayload(payload=u.payload, points=[u.id])
                    )
                )
            else:
                rest.append(u)
        for group, changed, unset in same_updates(rest):  # one operation per distinct change
            if changed:
                ops.append(
                    models.SetPayloadOperation(
                        set_payload=models.SetPayload(payload=changed, points=list(group))
                    )
                )
            if unset:
                ops.append(
                    models.DeletePayloadOperation(
                        delete_payload=models.DeletePayload(keys=list(unset), points=list(group))
                    )
                )
        if ops:
            with wrap_errors(f"update payloads in {collection!r}"):
                await self.client.batch_update_points(collection, ops, wait=True)
        return [u.id for u in updates if u.id not in found]

    async def delete(self, collection: str, ids: Sequence[str]) -> None:
        from qdrant_client import models

        with wrap_errors(f"delete from {collection!r}"):
            await self.client.delete(collection, models.PointIdsList(points=list(ids)), wait=True)

    async def retrieve(
        self, collection: str, ids: Sequence[str], *, with_vectors: bool = False
    ) -> list[SinkRecord]:
        with wrap_errors(f"retrieve from {collection!r}"):
            records = await self.client.retrieve(
                collection, list(ids), with_payload=True, with_vectors=with_vectors
            )
        layout = await self._layout(collection) if with_vectors else ()
        return [
            _record(r.id, r.payload, r.vector if with_vectors else None, layout) for r in records
        ]

    async def scroll(
        self,
        collection: str,
        *,
        with_vectors: bool = False,
        with_payload: bool = True,
        page: int = 1000,
    ) -> AsyncIterator[SinkRecord]:
        offset: Any = None
        layout = await self._layout(collection) if with_vectors else ()
        while True:
            with wrap_errors(f"scroll {collection!r}"):
                records, offset = await self.client.scroll(
                    collection,
                    limit=page,
                    offset=offset,
                    with_payload=with_payload,
                    with_vectors=with_vectors,
                )
            for r in records:
                yield _record(r.id, r.payload, r.vector if with_vectors else None, layout)
            if offset is None:
                return

    async def count(self, collection: str) -> int:
        with wrap_errors(f"count {collection!r}"):
            return (await self.client.count(collection, exact=True)).count

    async def search(
        self,
        collection: str,
        vector: Sequence[float],
        limit: int = 5,
        where: Sequence[Condition] = (),
    ) -> list[Hit]:
        layout = await self._layout(collection)
        using = layout[0].name if layout else None  # the first named vector is the default
        return await self._search(collection, using, vector, limit, where)

    async def search_vector(
        self,
        collection: str,
        name: str,
        vector: Sequence[float] | SparseVector,
        limit: int = 5,
        where: Sequence[Condition] = (),
    ) -> list[Hit]:
        return await self._search(collection, name, vector, limit, where)

    async def search_hybrid(
        self,
        collection: str,
        dense: tuple[str, Sequence[float]],
        sparse: tuple[str, SparseVector],
        limit: int = 5,
        where: Sequence[Condition] = (),
    ) -> list[Hit]:
        from qdrant_client import models

        found = _filter(where) if where else None
        candidates = limit * HYBRID_CANDIDATES
        prefetch = [
            models.Prefetch(query=list(dense[1]), using=dense[0], limit=candidates, filter=found),
            models.Prefetch(
                query=_sparse(sparse[1]), using=sparse[0], limit=candidates, filter=found
            ),
        ]
        with wrap_errors(f"search {collection!r}"):
            result = await self.client.query_points(
                collection,
                prefetch=prefetch,
                query=models.FusionQuery(fusion=models.Fusion.RRF),
                limit=limit,
                with_payload=True,
            )
        return [Hit(p.score, _record(p.id, p.payload, None, ())) for p in result.points]

    async def _search(
        self,
        collection: str,
        using: str | None,
        vector: Sequence[float] | SparseVector,
        limit: int,
        where: Sequence[Condition],
    ) -> list[Hit]:
        query = _sparse(vector) if isinstance(vector, SparseVector) else list(vector)
        with wrap_errors(f"search {collection!r}"):
            result = await self.client.query_points(
                collection,
                query=query,
                using=using,
                limit=limit,
                with_payload=True,
                query_filter=_filter(where) if where else None,
            )
        return [Hit(p.score, _record(p.id, p.payload, None, ())) for p in result.points]

    async def set_alias(self, alias: str, collection: str) -> None:
        from qdrant_client import models

        aliases = await self._aliases()
        check_set_alias(self.name, alias, collection, set(await self.collections()), aliases)
        if aliases.get(alias) == collection:
            return
        ops: list[models.AliasOperations] = []
        if alias in aliases:  # a server refuses to delete an alias that is not there
            ops.append(
                models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias))
            )
        create = models.CreateAlias(collection_name=collection, alias_name=alias)
        ops.append(models.CreateAliasOperation(create_alias=create))
        with wrap_errors(f"point alias {alias!r} at {collection!r}"):
            await self.client.update_collection_aliases(ops)  # one call: readers see old or new

    async def alias_target(self, alias: str) -> str | None:
        return (await self._aliases()).get(alias)

    async def is_alias(self, name: str) -> bool:
        return name in await self._aliases()

    async def _aliases(self) -> dict[str, str]:
        with wrap_errors("list aliases"):
            found = (await self.client.get_aliases()).aliases
        return {a.alias_name: a.collection_name for a in found}

    async def rename_collection(self, old: str, new: str) -> None:
        where = "a Qdrant server" if self._url is not None else "qdrant-client local mode"
        raise rename_unsupported(self.name, old, where)

    async def drop_collection(self, name: str) -> None:
        # Qdrant drops a collection's aliases with it: refuse first, so readers keep theirs
        check_drop(self.name, name, await self._aliases())
        with wrap_errors(f"drop collection {name!r}"):
            await self.client.delete_collection(name)  # False when missing: fine

    async def collections(self) -> list[str]:
        with wrap_errors("list collections"):
            found = (await self.client.get_collections()).collections
        return sorted(c.name for c in found)


def _filter(where: Sequence[Condition]) -> Any:
    from qdrant_client import models

    must: list[Any] = []
    must_not: list[Any] = []
    for c in where:
        if c.op in ("eq", "ne"):
            match = models.FieldCondition(key=c.field, match=models.MatchValue(value=c.value))
            (must if c.op == "eq" else must_not).append(match)
        else:
            bound = models.Range(**{c.op: c.value})
            must.append(models.FieldCondition(key=c.field, range=bound))
    return models.Filter(must=must or None, must_not=must_not or None)


def _sparse(v: SparseVector) -> Any:
    from qdrant_client import models

    return models.SparseVector(indices=v.indices, values=v.values)


def _shape(params: Any) -> Any:
    """Vector params as comparable values: (size, distance), or a dict of them by name."""
    if isinstance(params, dict):
        return {n: _shape(p) for n, p in params.items()}
    return (getattr(params, "size", None), getattr(params, "distance", None))


def _record(pid: Any, payload: Any, vector: Any, layout: tuple[VectorSpec, ...]) -> SinkRecord:
    extra: dict[str, list[float]] = {}
    if isinstance(vector, dict) and layout:
        extra = extra_vectors(layout, vector)
        vector = join_vectors(layout, vector)
    vec = [float(x) for x in vector] if isinstance(vector, list) else None
    return SinkRecord(id=str(pid), payload=dict(payload or {}), vector=vec, extra=extra)
