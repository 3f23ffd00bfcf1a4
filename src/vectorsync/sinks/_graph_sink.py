"""What the graph sinks (FalkorDB, Neo4j) share: one Cypher core over a query runner.

A collection is a node label: each point is a node ``(:<collection> {_vs_id: <point id>})``
with its payload as properties (:mod:`._graph_values`) and its vector in ``_vs_vector``,
under a range index on ``_vs_id``, a vector index on ``_vs_vector``, and a range index per
payload index the collection declares. The catalog lives in the graph beside the data:
one ``(:VectorsyncCollection {name, dimension, distance})`` node per collection (a label
without one is never adopted) and one ``(:VectorsyncAlias {name, collection})`` per alias;
each call resolves its name through them, so an alias swap (one property write) is seen
by the next call of every process. Labels and property names are backtick-quoted, values
travel as parameters. A batch is one ``UNWIND`` query, which the store applies whole.

Scores mean what they mean in Qdrant: cosine similarity (cosine vectors are stored
normalised) and the Euclidean distance for ``euclid`` (lower is nearer). Neither store's
vector index has a dot product: a ``dot`` collection is refused, naming the fix.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import PermanentError
from ..model import Condition, PayloadUpdate, Point, SinkRecord
from ..sources.cypher import ident
from ._aliases import check_drop, check_rename, check_set_alias
from ._graph_edges import (
    RECORD_KEY,
    EdgeSpec,
    backlink_query,
    base_collection,
    edge_rows,
    keys_of,
    link_query,
    unlink_query,
)
from ._graph_values import ID, JSON_KEY, VECTOR, cypher_where, from_properties, to_properties
from .base import CollectionSpec, Distance, Hit

__all__ = ["COLLECTION_LABEL", "RESERVED_LABELS", "Entry", "GraphSink", "check_label"]

logger = logging.getLogger(__name__)

COLLECTION_LABEL, ALIAS_LABEL = "VectorsyncCollection", "VectorsyncAlias"
RESERVED_LABELS = (COLLECTION_LABEL, ALIAS_LABEL, "VectorsyncCapture")
CHUNK = 500  # points per UNWIND query
PAGE = 10_000  # nodes per query that relabels or deletes a whole collection
_CANDIDATES = 10  # a filtered search asks the vector index for this many per hit wanted


def check_label(name: str) -> str | None:
    """Why a graph sink cannot use ``name`` as a collection's label, or None."""
    if name in RESERVED_LABELS:
        return f"the label {name!r} is vectorsync's own (its catalog)"
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """A collection (``alias_of`` None) or an alias, as the catalog holds it."""

    name: str
    alias_of: str | None = None
    dimension: int = 0
    distance: Distance = "cosine"


class GraphSink:
    """The Cypher core; a store's subclass runs queries and words its dialect."""

    name: str
    store = "graph store"
    edges: tuple[EdgeSpec, ...] = ()  # relationships the mappings declare (_graph_edges)
    is_list = "typeOf({}) = 'List'"  # a Cypher test that an expression is a list

    # -- what each store provides ---------------------------------------------------------
    async def run(
        self, what: str, query: str, params: dict[str, Any] | None = None, *, write: bool = True
    ) -> list[list[Any]]:
        raise NotImplementedError

    async def ddl(self, what: str, query: str) -> None:
        """Run a schema change; an index that already exists (or is already gone) is fine."""
        raise NotImplementedError

    def vector(self, expr: str) -> str:
        """A Cypher expression storing the list ``expr`` as a vector."""
        raise NotImplementedError

    def vector_param(self, vector: list[float]) -> Any:
        """A vector as the store's client takes it as a query parameter."""
        return vector

    def vector_index(self, label: str, dimension: int, distance: Distance) -> str:
        raise NotImplementedError

    def drop_vector_index(self, label: str) -> str:
        raise NotImplementedError

    def range_index(self, label: str, prop: str) -> str:
        raise NotImplementedError

    def drop_range_index(self, label: str, prop: str) -> str:
        raise NotImplementedError

    def nearest(self, label: str) -> str:
        """A call yielding ``node, score``: the ``$k`` nodes nearest ``$q`` by the index
        (``$label`` holds the label as a value, ``$index`` the index's name)."""
        raise NotImplementedError

    def index_name(self, label: str, prop: str) -> str:
        """The name of the index on ``prop`` of ``label`` (for stores that name them)."""
        return f"vectorsync_{label}_{prop}"

    def distance_to(self, distance: Distance, expr: str) -> str:
        """The exact distance (or similarity) of vector ``expr`` to ``$q``, as ``nearest``
        scores it."""
        raise NotImplementedError

    def score(self, distance: Distance, raw: float) -> float:
        """A store's score as Qdrant's."""
        raise NotImplementedError

    nearest_first = "ASC"  # how ``nearest``'s raw scores sort, nearest first

    # -- the catalog ----------------------------------------------------------------------
    async def _catalog(self) -> dict[str, Entry]:
        rows = await self.run(
            "read the catalog",
            f"MATCH (c:{COLLECTION_LABEL}) RETURN c.name AS name, null AS alias_of, "
            "c.dimension AS dimension, c.distance AS distance "
            f"UNION ALL MATCH (a:{ALIAS_LABEL}) RETURN a.name AS name, a.collection AS "
            "alias_of, 0 AS dimension, null AS distance",
            write=False,
        )
        return {
            str(n): Entry(name=str(n), alias_of=a, dimension=int(d or 0), distance=s or "cosine")
            for n, a, d, s in rows
        }

    async def _resolve(self, name: str) -> Entry:
        """The collection ``name`` is, or the one the alias ``name`` names."""
        rows = await self.run(
            f"resolve {name!r}",
            f"OPTIONAL MATCH (a:{ALIAS_LABEL} {{name: $name}}) "
            "WITH a IS NOT NULL AS via, coalesce(a.collection, $name) AS target "
            f"OPTIONAL MATCH (c:{COLLECTION_LABEL} {{name: target}}) "
            "RETURN via, target, c.dimension, c.distance",
            {"name": name},
            write=False,
        )
        fallback: list[Any] = [False, name, None, None]
        via, target, dimension, distance = rows[0] if rows else fallback
        if dimension is None:
            if via:
                raise PermanentError(
                    f"sink {self.name!r}: alias {name!r} names {target!r}, which is missing; "
                    "point it at a collection with set_alias"
                )
            raise PermanentError(
                f"sink {self.name!r}: no collection {name!r} in {self._where()}; "
                "ensure_collection creates it"
            )
        return Entry(name=str(target), dimension=int(dimension), distance=distance)

    def _where(self) -> str:
        return self.store

    # -- collections ----------------------------------------------------------------------
    async def ensure_collection(self, spec: CollectionSpec) -> None:
        catalog = await self._catalog()
        entry = catalog.get(spec.name)
        if entry is not None and entry.alias_of is not None:
            entry = await self._resolve(spec.name)
        if entry is None:
            entry = await self._create(spec)
        if (entry.dimension, entry.distance) != (spec.dimension, spec.distance):
            raise PermanentError(
                f"sink {self.name!r}: collection {entry.name!r} has dimension "
                f"{entry.dimension} and {entry.distance} distance, not {spec.dimension} and "
                f"{spec.distance}; use another collection name"
            )
        for field in sorted(spec.indexes):
            await self.ddl(
                f"index {field!r} of {entry.name!r}", self.range_index(entry.name, field)
            )
        await self._edge_indexes(spec.name, entry.name)

    async def _edge_indexes(self, collection: str, label: str) -> None:
        """The indexes the relationship queries look nodes up by."""
        wanted: set[tuple[str, str]] = set()
        for e in self._edges_from(collection):
            if not e.many:
                wanted.add((label, e.field))  # backlinks find the nodes naming a key
            if e.label is not None:
                wanted.add((e.label, e.key))  # links merge the targets by key
        if any(e.to in (collection, base_collection(collection)) for e in self.edges):
            wanted.add((label, RECORD_KEY))
        for on, prop in sorted(wanted):
            await self.ddl(f"index {prop!r} of {on!r}", self.range_index(on, prop))

    async def _create(self, spec: CollectionSpec) -> Entry:
        if (why := check_label(spec.name)) is not None:
            raise PermanentError(
                f"sink {self.name!r}: cannot make collection {spec.name!r}: {why}; set the "
                "mapping's collection to another name"
            )
        if spec.distance == "dot":
            raise PermanentError(
                f"sink {self.name!r}: collection {spec.name!r}: the {self.store} vector index "
                "has cosine and euclidean distances, no dot product; use an embedder with "
                "cosine distance (for normalised vectors it ranks as the dot product does)"
            )
        await self._check_free(spec.name, f"create collection {spec.name!r}")
        await self.ddl(f"index the ids of {spec.name!r}", self.range_index(spec.name, ID))
        await self.ddl(
            f"index the vectors of {spec.name!r}",
            self.vector_index(spec.name, spec.dimension, spec.distance),
        )
        rows = await self.run(  # another process may have made it meanwhile: its shape wins
            f"create collection {spec.name!r}",
            f"MERGE (c:{COLLECTION_LABEL} {{name: $name}}) "
            "ON CREATE SET c.dimension = $dimension, c.distance = $distance "
            "RETURN c.dimension, c.distance",
            {"name": spec.name, "dimension": spec.dimension, "distance": spec.distance},
        )
        logger.info(
            "created collection %s",
            spec.name,
            extra={"action": "sink_create", "sink": self.name, "collection": spec.name},
        )
        return Entry(name=spec.name, dimension=int(rows[0][0]), distance=rows[0][1])

    async def _check_free(self, label: str, what: str) -> None:
        """PermanentError if nodes of someone else's carry the label ``label``."""
        rows = await self.run(
            f"look for nodes labelled {label!r}",
            f"MATCH (n:{ident(label)}) RETURN count(n) > 0 LIMIT 1",
            write=False,
        )
        if rows and rows[0][0]:
            raise PermanentError(
                f"sink {self.name!r}: cannot {what}: nodes labelled {label!r} exist in "
                f"{self._where()} and are not vectorsync's; relabel them, or give the sink a "
                "graph of its own"
            )

    # -- writes ---------------------------------------------------------------------------
    async def upsert(self, collection: str, points: Sequence[Point]) -> None:
        entry = await self._resolve(collection)
        latest = list({p.id: p for p in points}.values())  # a query writes a node once
        rows = [self._row(entry, p) for p in latest]  # every point checked before a write
        query = (
            f"UNWIND $rows AS r MERGE (n:{ident(entry.name)} {{{ID}: r.id}}) "
            f"SET n = r.p, n.{VECTOR} = {self.vector('r.v')}"
        )
        for i in range(0, len(rows), CHUNK):
            await self.run(f"upsert into {collection!r}", query, {"rows": rows[i : i + CHUNK]})
        if self.edges:
            await self._link(collection, entry, {p.id: p.payload for p in latest})
            await self._backlink(collection, entry, [p.payload.get(RECORD_KEY) for p in latest])

    def _row(self, entry: Entry, p: Point) -> dict[str, Any]:
        if len(p.vector) != entry.dimension:
            raise PermanentError(
                f"sink {self.name!r}: point {p.id} has a vector of dimension {len(p.vector)}; "
                f"collection {entry.name!r} holds dimension {entry.dimension}"
            )
        norm = math.hypot(*p.vector)  # NaN or infinity if any component is one
        if not math.isfinite(norm):
            raise PermanentError(
                f"sink {self.name!r}: point {p.id} has a vector with NaN or infinity, which "
                f"{self.store} refuses"
            )
        vector = p.vector
        if entry.distance == "cosine" and norm > 0:  # stored normalised, as Qdrant does
            vector = [x / norm for x in vector]
        props, encoded = to_properties(self.name, p.id, p.payload)
        props[ID] = p.id
        if encoded:
            props[JSON_KEY] = encoded
        return {"id": p.id, "p": props, "v": self.vector_param(vector)}

    async def update_payloads(self, collection: str, updates: Sequence[PayloadUpdate]) -> list[str]:
        entry = await self._resolve(collection)
        latest = list({u.id: u for u in updates}.values())
        rows: list[dict[str, Any]] = []
        for u in latest:
            props, encoded = to_properties(self.name, u.id, u.set)
            # a property set to null is removed: that is how removed fields go
            props.update({k: None for k in u.unset if k not in props})
            rows.append({"id": u.id, "m": props, "touched": list(props), "json": encoded})
        query = (
            f"UNWIND $rows AS r MATCH (n:{ident(entry.name)} {{{ID}: r.id}}) "
            f"WITH n, r, [k IN coalesce(n.{JSON_KEY}, []) WHERE NOT k IN r.touched] + r.json AS j "
            f"SET n += r.m, n.{JSON_KEY} = CASE WHEN size(j) = 0 THEN null ELSE j END "
            "RETURN count(n)"
        )
        missing: set[str] = set()
        for i in range(0, len(rows), CHUNK):
            chunk = rows[i : i + CHUNK]
            done = await self.run(f"update payloads in {collection!r}", query, {"rows": chunk})
            if int(done[0][0]) < len(chunk):  # rare: ask which (the ids alone cost a parse)
                missing.update(await self._missing(entry, [r["id"] for r in chunk]))
        if self.edges:
            for e in self._edges_from(collection):
                moved = {u.id: _new_payload(u) for u in latest if e.field in (*u.set, *u.unset)}
                await self._link(collection, entry, moved, only=e)
        return [u.id for u in updates if u.id in missing]

    async def _missing(self, entry: Entry, ids: list[str]) -> list[str]:
        rows = await self.run(
            f"look for points of {entry.name!r}",
            f"UNWIND $ids AS id OPTIONAL MATCH (n:{ident(entry.name)} {{{ID}: id}}) "
            "WITH id, n WHERE n IS NULL RETURN id",
            {"ids": ids},
            write=False,
        )
        return [str(r[0]) for r in rows]

    async def delete(self, collection: str, ids: Sequence[str]) -> None:
        entry = await self._resolve(collection)
        query = f"UNWIND $ids AS id MATCH (n:{ident(entry.name)} {{{ID}: id}}) DETACH DELETE n"
        for i in range(0, len(ids), CHUNK):
            await self.run(f"delete from {collection!r}", query, {"ids": list(ids[i : i + CHUNK])})

    # -- relationships --------------------------------------------------------------------
    def _edges_from(self, collection: str) -> list[EdgeSpec]:
        names = (collection, base_collection(collection))
        return [e for e in self.edges if e.source in names]

    async def _label_of(self, collection: str) -> str | None:
        """The live label of a collection, None while it does not exist."""
        try:
            return (await self._resolve(collection)).name
        except PermanentError:
            return None

    async def _link(
        self,
        collection: str,
        entry: Entry,
        payloads: dict[str, Any],
        *,
        only: EdgeSpec | None = None,
    ) -> None:
        """Make the written nodes' edges what their payloads name (``_graph_edges``)."""
        for e in self._edges_from(collection) if only is None else [only]:
            target = e.label if e.to is None else await self._label_of(e.to)
            if target is None or not payloads:
                continue  # the targets' collection comes later: its writes link back
            rows = edge_rows(e, payloads)
            what = f"relate {collection!r} -[:{e.type}]-> {target!r}"
            for i in range(0, len(rows), CHUNK):
                chunk = {"rows": rows[i : i + CHUNK]}
                await self.run(what, unlink_query(entry.name, e, target), chunk)
                await self.run(what, link_query(entry.name, e, target), chunk)

    async def _backlink(self, collection: str, entry: Entry, keys: list[Any]) -> None:
        """Give nodes just written to a ``to`` collection the edges of the nodes naming them."""
        names = (collection, base_collection(collection))
        wanted = keys_of(keys)
        for e in self.edges:
            if e.to not in names or not wanted:
                continue
            source = await self._label_of(e.source)
            if source is None:
                continue
            query = backlink_query(source, e, entry.name, self.is_list)
            for i in range(0, len(wanted), CHUNK):
                await self.run(
                    f"relate {e.source!r} -[:{e.type}]-> {collection!r}",
                    query,
                    {"keys": wanted[i : i + CHUNK]},
                )

    # -- reads ----------------------------------------------------------------------------
    def _returned(self, var: str, *, payload: bool = True, vectors: bool = False) -> str:
        """The columns of a record: id, properties without the vector, the vector."""
        props = f"{var} {{.*, {VECTOR}: null}}" if payload else "null"
        return f"{var}.{ID}, {props}, {f'{var}.{VECTOR}' if vectors else 'null'}"

    async def retrieve(
        self, collection: str, ids: Sequence[str], *, with_vectors: bool = False
    ) -> list[SinkRecord]:
        entry = await self._resolve(collection)
        query = (
            f"UNWIND $ids AS id MATCH (n:{ident(entry.name)} {{{ID}: id}}) "
            f"RETURN {self._returned('n', vectors=with_vectors)}"
        )
        found: dict[str, SinkRecord] = {}
        unique = list(dict.fromkeys(ids))
        for i in range(0, len(unique), CHUNK):
            rows = await self.run(
                f"retrieve from {collection!r}", query, {"ids": unique[i : i + CHUNK]}, write=False
            )
            found.update((r.id, r) for r in map(_record, rows))
        return [found[i] for i in unique if i in found]

    async def scroll(
        self,
        collection: str,
        *,
        with_vectors: bool = False,
        with_payload: bool = True,
        page: int = 1000,
    ) -> AsyncIterator[SinkRecord]:
        after = ""  # every id sorts after the empty text
        while True:
            entry = await self._resolve(collection)
            rows = await self.run(
                f"scroll {collection!r}",
                f"MATCH (n:{ident(entry.name)}) WHERE n.{ID} > $after "
                f"RETURN {self._returned('n', payload=with_payload, vectors=with_vectors)} "
                f"ORDER BY n.{ID} LIMIT $page",
                {"after": after, "page": page},
                write=False,
            )
            for r in rows:
                yield _record(r)
            if len(rows) < page:
                return
            after = str(rows[-1][0])

    async def count(self, collection: str) -> int:
        return await self._count(await self._resolve(collection))

    async def _count(self, entry: Entry) -> int:
        rows = await self.run(
            f"count {entry.name!r}", f"MATCH (n:{ident(entry.name)}) RETURN count(n)", write=False
        )
        return int(rows[0][0]) if rows else 0

    async def search(
        self,
        collection: str,
        vector: Sequence[float],
        limit: int = 5,
        where: Sequence[Condition] = (),
    ) -> list[Hit]:
        entry = await self._resolve(collection)
        if len(vector) != entry.dimension:
            raise PermanentError(
                f"sink {self.name!r}: a query vector of dimension {len(vector)} for collection "
                f"{entry.name!r}, which holds dimension {entry.dimension}"
            )
        filters, params = cypher_where("n", where, self.is_list)
        query = self.vector_param([float(x) for x in vector])
        params.update(
            q=query, limit=limit, label=entry.name, index=self.index_name(entry.name, VECTOR)
        )
        knn = (
            f"CALL {self.nearest(entry.name)} YIELD node, score WITH node AS n, score "
            f"{f'WHERE {filters} ' if filters else ''}"
            f"RETURN {self._returned('n')}, score ORDER BY score {self.nearest_first} "
            "LIMIT $limit"
        )
        # The index yields fewer than k nodes once nodes were rewritten (FalkorDB keeps the
        # replaced entries until the index is rebuilt), and filters drop candidates: ask
        # for more than the limit, then many more, then read every (matching) node.
        first = max(limit * (_CANDIDATES if filters else 4), 100 if filters else 20)
        for k in (first, first * 8):
            rows = await self.run(f"search {collection!r}", knn, {**params, "k": k}, write=False)
            if len(rows) >= limit or len(rows) == await self._count(entry):
                break
        else:
            rows = await self.run(
                f"search {collection!r}",
                f"MATCH (n:{ident(entry.name)}) {f'WHERE {filters} ' if filters else ''}"
                f"WITH n, {self.distance_to(entry.distance, f'n.{VECTOR}')} AS score "
                f"RETURN {self._returned('n')}, score ORDER BY score {self.nearest_first} "
                "LIMIT $limit",
                params,
                write=False,
            )
        return [Hit(self.score(entry.distance, float(r[3])), _record(r)) for r in rows]

    # -- aliases --------------------------------------------------------------------------
    async def set_alias(self, alias: str, collection: str) -> None:
        catalog = await self._catalog()
        physical, aliases = _split(catalog)
        check_set_alias(self.name, alias, collection, physical, aliases)
        if aliases.get(alias) == collection:
            return
        await self.run(  # one property write: a reader resolves the old target or the new
            f"point alias {alias!r} at {collection!r}",
            f"MERGE (a:{ALIAS_LABEL} {{name: $alias}}) SET a.collection = $collection",
            {"alias": alias, "collection": collection},
        )

    async def alias_target(self, alias: str) -> str | None:
        entry = (await self._catalog()).get(alias)
        return entry.alias_of if entry is not None else None

    async def is_alias(self, name: str) -> bool:
        return await self.alias_target(name) is not None

    async def rename_collection(self, old: str, new: str) -> None:
        catalog = await self._catalog()
        physical, aliases = _split(catalog)
        check_rename(self.name, old, new, physical, aliases)
        if (why := check_label(new)) is not None:
            raise PermanentError(f"sink {self.name!r}: cannot rename {old!r} to {new!r}: {why}")
        await self._check_free(new, f"rename {old!r} to {new!r}")
        entry = catalog[old]
        await self.ddl(f"index the ids of {new!r}", self.range_index(new, ID))
        await self.ddl(
            f"index the vectors of {new!r}",
            self.vector_index(new, entry.dimension, entry.distance),
        )
        await self._in_pages(
            f"rename {old!r} to {new!r}",
            f"MATCH (n:{ident(old)}) WITH n LIMIT {PAGE} SET n:{ident(new)} REMOVE n:{ident(old)} "
            "RETURN count(n)",
        )
        await self.run(
            f"rename {old!r} to {new!r}",
            f"MATCH (c:{COLLECTION_LABEL} {{name: $old}}) SET c.name = $new",
            {"old": old, "new": new},
        )
        await self._drop_indexes(old)

    async def drop_collection(self, name: str) -> None:
        catalog = await self._catalog()
        check_drop(self.name, name, _split(catalog)[1])
        if name not in catalog:
            return
        await self._in_pages(
            f"drop collection {name!r}",
            f"MATCH (n:{ident(name)}) WITH n LIMIT {PAGE} DETACH DELETE n RETURN count(n)",
        )
        await self.run(
            f"drop collection {name!r}",
            f"MATCH (c:{COLLECTION_LABEL} {{name: $name}}) DELETE c",
            {"name": name},
        )
        await self._drop_indexes(name)

    async def _in_pages(self, what: str, query: str) -> None:
        """Run a query over ``PAGE`` nodes at a time until it finds none (each a short
        query: a graph store runs one write at a time, the others wait behind it)."""
        while (rows := await self.run(what, query)) and int(rows[0][0]) > 0:
            pass

    async def _drop_indexes(self, label: str) -> None:
        await self.ddl(f"drop the vector index of {label!r}", self.drop_vector_index(label))
        await self.ddl(f"drop the id index of {label!r}", self.drop_range_index(label, ID))

    async def collections(self) -> list[str]:
        return sorted(_split(await self._catalog())[0])


def _split(catalog: dict[str, Entry]) -> tuple[set[str], dict[str, str]]:
    physical = {n for n, e in catalog.items() if e.alias_of is None}
    aliases = {n: e.alias_of for n, e in catalog.items() if e.alias_of is not None}
    return physical, aliases


def _new_payload(u: PayloadUpdate) -> dict[str, Any]:
    """The payload an update leaves (its ``payload``, or what ``set`` and ``unset`` say)."""
    new = {**u.payload, **u.set}
    for k in u.unset:
        new.pop(k, None)
    return new


def _record(row: Sequence[Any]) -> SinkRecord:
    vector = row[2]
    return SinkRecord(
        id=str(row[0]),
        payload=from_properties(row[1] or {}),
        vector=None if vector is None else [float(x) for x in vector],
    )
