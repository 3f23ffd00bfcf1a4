"""Conflicts: points whose payload or vector was edited in the sink by someone else, and
the policy that resolves them (see docs/conflicts.md).

A point is in conflict when a payload field of the mapping holds, in the sink, another value
than vectorsync last wrote there (the record state's payload: the base of a three-way
comparison). With ``conflicts = "source_wins"`` (the default) nothing extra is read while
syncing — a sink edit is overwritten by the record's next write, and ``check`` finds and
logs the ones still there. With another policy, the sync reads the points of each batch's
records before writing them and resolves field by field:

* ``latest_wins``: the side whose ``conflict_timestamp`` field is newer is the record as
  it stands, every field;
* ``merge``: a field only the sink changed is kept, one only the source changed is written,
  one both changed follows ``merge_tie``.

A kept sink value stands until the source changes that field again: it is remembered with
the source's value at the time (``Kept``), laid over the source's payload by the sync and
the checks alike, and dropped when the source's value moves. With ``write_back = true`` the
kept values of the table's own columns are written to the source row instead, and its echo
is recognised as our own (its payload is what the point holds already: nothing is written).

A point's vector is in conflict when it differs from the one vectorsync last wrote (the
embedding cache's vector of the record state's text hash; compared as the sink stores it,
normalized for cosine). Its field in the log is ``vector``. The policies treat it as one more
field: ``latest_wins`` keeps the newer side's, ``merge`` keeps it while the source's text is
unchanged (a new text is a tie: ``merge_tie``), ``keep_both`` moves it to the point's named
vector ``foreign`` and writes the source's vector as the main one (``text``, the search
default). A kept sink vector is remembered by its digest (``KEPT_VECTOR`` in ``Kept``) until
the source's text changes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import xxhash

from .config import MappingConfig
from .embed.base import Embedder
from .embed.named import layout_of
from .errors import ConfigError
from .model import Key, SinkRecord, key_text
from .sinks.base import Distance, VectorSpec
from .sources.base import TableSpec, WritesBack

if TYPE_CHECKING:
    from .engine import Engine
    from .sinks.base import Sink
    from .state.store import StateStore

__all__ = [
    "FOREIGN",
    "KEPT_VECTOR",
    "MAIN",
    "VECTOR",
    "Conflict",
    "Kept",
    "Resolution",
    "Resolver",
    "VectorResolution",
    "apply_kept",
    "layout_for",
    "resolve_manually",
    "vector_conflicts",
]

Policy = Literal["source_wins", "latest_wins", "merge", "keep_both"]
VECTOR = "vector"  # a record's vector, as a field of the conflict log
KEPT_VECTOR = "_vs_vector"  # in Kept: (the kept sink vector's digest, the text hash it stands over)
MAIN, FOREIGN = "text", "foreign"  # keep_both's named vectors: the source's, the kept one
# field → (the sink's value kept, the source's value when it was kept)
Kept = dict[str, tuple[Any, Any]]
_MISSING: Any = object()


@dataclass(frozen=True, slots=True, kw_only=True)
class Conflict:
    """One conflict as logged: per field, the base, source and sink values and the result."""

    mapping: str
    key: str
    policy: str
    resolution: str  # source_written | sink_kept | merged | kept_both | detected (by a check)
    fields: dict[str, dict[str, Any]]
    detected: Literal["sync", "check"] = "sync"
    at: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True, kw_only=True)
class Resolution:
    payload: dict[str, Any]  # the mapping's payload fields as they are to be
    kept: Kept  # fields where the sink's value stands over the source's
    conflict: Conflict


def apply_kept(payload: Mapping[str, Any], kept: Kept | None) -> tuple[dict[str, Any], Kept]:
    """The source's payload with the sink values kept earlier laid over it, and what is
    still kept: a field whose source value moved since is the source's again."""
    out = dict(payload)
    still: Kept = {}
    for name, (value, was) in (kept or {}).items():
        if name in out and out[name] == was:
            out[name] = value
            still[name] = (value, was)
    return out, still


def _get(payload: Mapping[str, Any], name: str) -> Any:
    return payload.get(name, _MISSING)


def _shown(value: Any) -> Any:
    return None if value is _MISSING else value


class Resolver:
    """Resolves a mapping's conflicts by its policy."""

    def __init__(self, m: MappingConfig) -> None:
        self.mapping = m.name
        self.policy: str = m.conflicts
        self.fields = tuple(m.payload)
        related = {f for r in m.related for f in r.fields}
        self.columns = frozenset(f for f in m.payload if f not in related)  # write_back's
        self.timestamp = m.conflict_timestamp
        self.tie = m.merge_tie

    def resolve_vector(
        self,
        *,
        base: Sequence[float] | None,
        sink: SinkRecord,
        parts: Parts,
        text_hash: str,
        text_changed: bool,
        kept: tuple[str, str] | None,
        source_payload: Mapping[str, Any],
    ) -> VectorResolution | None:
        """What becomes of a point's vector another edited (None: it holds ours).
        ``base``: the vector last written (None: unknown, e.g. the embedding cache off);
        ``kept``: the sink vector a policy kept before (its digest, the text hash then)."""
        if sink.vector is None:
            return None
        if kept is None and (base is None or same_vector(base, sink.vector, parts)):
            return None  # the common case: no digest made
        held = vector_digest(sink.vector, parts)
        assert held is not None
        if kept is not None:
            if held == kept[0]:  # still kept; once the source's text moved, its vector again
                return VectorResolution(action="keep", kept=kept) if kept[1] == text_hash else None
            was = kept[0]
        else:
            was = vector_digest(base, parts) or ""
        if self.policy == "latest_wins":
            assert self.timestamp is not None
            sink_newer = _newer(
                _get(sink.payload, self.timestamp), _get(source_payload, self.timestamp)
            )
            keep = sink_newer
        elif self.policy == "merge":
            keep = not text_changed or self.tie == "sink"
        else:
            keep = False
        logged = {"base": was, "source": "text" if text_changed else was, "sink": held}
        if self.policy == "keep_both":
            logged["result"] = f"{MAIN}: source, {FOREIGN}: {held}"
            return VectorResolution(
                action="both",
                kept=None,
                foreign=list(sink.vector),
                logged=logged,
                resolution="kept_both",
            )
        if keep:
            logged["result"] = held
            return VectorResolution(
                action="keep", kept=(held, text_hash), logged=logged, resolution="sink_kept"
            )
        logged["result"] = "source"
        return VectorResolution(action="write", kept=None, logged=logged)

    def edited(self, base: Mapping[str, Any], sink: Mapping[str, Any]) -> list[str]:
        """The mapping's fields the sink holds with another value than last written."""
        return [f for f in self.fields if _get(sink, f) != _get(base, f)]

    def resolve(
        self,
        key: str,
        base: Mapping[str, Any],
        source: Mapping[str, Any],
        sink: Mapping[str, Any],
    ) -> Resolution | None:
        """None when the sink holds what was last written (or what the source holds now)."""
        edited = [f for f in self.edited(base, sink) if _get(sink, f) != _get(source, f)]
        if not edited:
            return None
        changed = {f for f in self.fields if _get(source, f) != _get(base, f)}
        result = {f: source[f] for f in self.fields if f in source}
        if self.policy == "latest_wins":
            assert self.timestamp is not None
            sink_newer = _newer(_get(sink, self.timestamp), _get(source, self.timestamp))
            # the newer side is the record as it is: every field it holds
            differ = {f for f in self.fields if _get(sink, f) != _get(source, f)}
            take = differ if sink_newer else set()
            resolution = "sink_kept" if sink_newer else "source_written"
        elif self.policy == "merge":
            both = {f for f in edited if f in changed}
            take = {f for f in edited if f not in changed} | (both if self.tie == "sink" else set())
            resolution = (
                "sink_kept" if take == set(edited) else "merged" if take else "source_written"
            )
        else:  # source_wins: what a check logs (the sync reads nothing to find it)
            take, resolution = set(), "source_written"
        for f in take:
            value = _get(sink, f)
            if value is _MISSING:
                result.pop(f, None)
            else:
                result[f] = value
        kept: Kept = {f: (result.get(f), source.get(f)) for f in take}
        fields = {
            f: {
                "base": _shown(_get(base, f)),
                "source": _shown(_get(source, f)),
                "sink": _shown(_get(sink, f)),
                "result": result.get(f),
            }
            for f in sorted({*edited, *take})
        }
        conflict = Conflict(
            mapping=self.mapping,
            key=key,
            policy=self.policy,
            resolution=resolution,
            fields=fields,
        )
        return Resolution(payload=result, kept=kept, conflict=conflict)


@dataclass(frozen=True, slots=True, kw_only=True)
class VectorResolution:
    """What becomes of a point's vector: ``write`` the source's, ``keep`` the sink's (no
    vector written), or ``both``: the sink's moved to ``FOREIGN``, the source's written."""

    action: Literal["write", "keep", "both"]
    kept: tuple[str, str] | None  # KEPT_VECTOR's value from now on (None: nothing kept)
    foreign: list[float] | None = None  # both: the sink's vector
    logged: dict[str, Any] | None = None  # the conflict log's entry; None: no new conflict
    resolution: str = "source_written"


def layout_for(m: MappingConfig, embedder: Embedder) -> tuple[VectorSpec, ...]:
    """The named vectors of the mapping's points: the embedder's, or with keep_both the
    source's vector (``MAIN``, the search default) and the kept foreign one."""
    layout = layout_of(embedder)
    if m.conflicts != "keep_both":
        return layout
    dim, distance = embedder.dimension, embedder.distance
    return (
        VectorSpec(name=MAIN, dimension=dim, distance=distance),
        VectorSpec(name=FOREIGN, dimension=dim, distance=distance, extra=True),
    )


Parts = tuple[tuple[int, int, Distance], ...]  # the dense vectors of a concatenation


def vector_parts(embedder: Embedder) -> Parts:
    """Where each dense vector lies in a point's vector, and how the sink stores it."""
    return parts_of(layout_of(embedder), embedder.dimension, embedder.distance)


def parts_of(layout: Sequence[VectorSpec], dimension: int, distance: Distance) -> Parts:
    """``vector_parts`` of a collection's layout (empty: one vector of that dimension)."""
    layout = [v for v in layout if not (v.sparse or v.extra)]
    if not layout:
        return ((0, dimension, distance),)
    out, at = [], 0
    for v in layout:
        out.append((at, at + v.dimension, v.distance))
        at += v.dimension
    return tuple(out)


def _stored(vector: Sequence[float], parts: Parts) -> list[float]:
    """A vector as a Qdrant sink stores it: each cosine part normalized."""
    out: list[float] = []
    for start, end, distance in parts:
        part = [float(x) for x in vector[start:end]]
        if distance == "cosine":
            norm = math.sqrt(sum(x * x for x in part)) or 1.0
            part = [x / norm for x in part]
        out.extend(part)
    return out


def same_vector(a: Sequence[float], b: Sequence[float], parts: Parts) -> bool:
    """Equal as stored (float32 in the sink: a tolerance, not equality): a cosine part
    within 1e-6 of the same direction (its norm is the sink's business), another within
    1e-5 of the other's length. Runs for every point a batch reads under a resolving policy:
    three C-level calls per part (hypot, dist), no Python loop over the dimensions."""
    if len(a) != len(b):
        return False
    whole = len(parts) == 1
    for start, end, distance in parts:
        x, y = (a, b) if whole else (a[start:end], b[start:end])
        nx, ny, d = math.hypot(*x), math.hypot(*y), math.dist(x, y)
        if distance == "cosine":
            if nx == 0.0 or ny == 0.0:
                if nx != ny:
                    return False
            # cos = (|x|² + |y|² - |x - y|²) / (2 |x| |y|)
            elif nx * nx + ny * ny - d * d < (1 - 1e-6) * 2 * nx * ny:
                return False
        elif d > 1e-5 * max(1.0, ny):
            return False
    return True


def vector_digest(vector: Sequence[float] | None, parts: Parts) -> str | None:
    """A short, stable name of a vector as stored (what the log shows, what Kept holds)."""
    if vector is None:
        return None
    rounded = ",".join(f"{x:.4f}" for x in _stored(vector, parts))
    return "vec:" + xxhash.xxh3_64_hexdigest(rounded.encode())


def combined(payload: Conflict | None, vec: VectorResolution | None, c: Conflict) -> Conflict:
    """One log entry for a record: its payload fields' conflict and its vector's."""
    if vec is None or vec.logged is None:
        assert payload is not None
        return payload
    if payload is None:
        return dataclasses.replace(c, resolution=vec.resolution, fields={VECTOR: vec.logged})
    both = {payload.resolution, vec.resolution}
    resolution = both.pop() if len(both) == 1 else "merged"
    if vec.resolution == "kept_both":
        resolution = "kept_both"
    fields = {**payload.fields, VECTOR: vec.logged}
    return dataclasses.replace(payload, resolution=resolution, fields=fields)


def _newer(sink: Any, source: Any) -> bool:
    """Whether the sink's timestamp is later than the source's (numbers, or ISO texts)."""
    if sink is _MISSING or sink is None:
        return False
    if source is _MISSING or source is None:
        return True
    try:
        return bool(sink > source)
    except TypeError:  # of two types: as text
        return str(sink) > str(source)


async def vector_conflicts(
    resolver: Resolver,
    *,
    sink: Sink,
    collection: str,
    state: StateStore,
    state_name: str,
    model_id: str,
    parts: Parts,
    kept: Mapping[str, Kept],
    page: int = 500,
) -> list[tuple[Key, str, Conflict]]:
    """A check's pass over every point's vector: (key, point id, conflict) of each whose
    vector differs from the one last written (and no policy kept). Reads the vectors of the
    whole collection and the embedding cache: only mappings with a policy that resolves
    conflicts run it."""
    found: list[tuple[Key, str, Conflict]] = []
    held: list[tuple[Key, SinkRecord]] = []

    async def compare() -> None:
        states = await state.record_states(state_name, [key_text(k) for k, _ in held])
        hashes = sorted({st.text_hash for st in states.values()})
        base = await state.cached_vectors(model_id, hashes) if hashes else {}
        for key, rec in held:
            st = states.get(key_text(key))
            if st is None or st.point_id != rec.id:
                continue
            res = resolver.resolve_vector(
                base=base.get(st.text_hash),
                sink=rec,
                parts=parts,
                text_hash=st.text_hash,
                text_changed=False,
                kept=(kept.get(st.key) or {}).get(KEPT_VECTOR),
                source_payload=rec.payload,
            )
            if res is not None and res.logged is not None:
                logged = {**res.logged, "result": None}
                c = Conflict(
                    mapping=resolver.mapping,
                    key=st.key,
                    policy=resolver.policy,
                    resolution="detected",
                    fields={VECTOR: logged},
                    detected="check",
                )
                found.append((key, rec.id, c))
        held.clear()

    async for rec in sink.scroll(collection, with_vectors=True, page=page):
        key = rec.payload.get("_vs_key")
        if key is not None:
            held.append((key, rec))
        if len(held) >= page:
            await compare()
    if held:
        await compare()
    return found


async def resolve_manually(
    engine: Engine, conflict_id: int, keep: Literal["source", "sink"]
) -> dict[str, Any]:
    """Apply a person's choice to a logged conflict: ``source`` rewrites the record from
    the source (dropping what its policy kept); ``sink`` keeps the values the sink held
    when the conflict was found (written back where ``write_back`` is set). The record is then
    synced through the normal path; the conflict is marked resolved."""
    found = await engine.state.conflicts(ids=[conflict_id], limit=1)
    if not found:
        raise ConfigError(f"no conflict with id {conflict_id}: see `vectorsync conflicts list`")
    c = found[0]
    m = engine.mapping(c["mapping"])
    if keep == "sink" and m.conflicts == "source_wins":
        raise ConfigError(
            f'mapping {m.name!r} has conflicts = "source_wins", which keeps no sink value: set '
            'conflicts = "merge" (or "latest_wins") to keep sink edits'
        )
    native: Key = int(c["key"]) if engine.int_key(m) else c["key"]
    kept = (await engine.state.kept(m.name, [c["key"]])).get(c["key"], {})
    if keep == "source":
        await engine.state.set_kept({(m.name, c["key"]): None})
        await engine.state.forget(m.name, [c["key"]])
    else:
        source = engine.sources[m.source]
        rows = await source.fetch(m.table, m.key, [native])
        if native not in rows:
            raise ConfigError(
                f"conflict {conflict_id}: record {c['key']!r} is gone from the source"
            )
        # what the other side wrote (a vector it wrote is gone, or kept as FOREIGN)
        values = {f: v["sink"] for f, v in c["fields"].items() if f in m.payload}
        back = {f: v for f, v in values.items() if f in Resolver(m).columns}
        if m.write_back and back:
            assert isinstance(source, WritesBack)
            await source.write_back(TableSpec(table=m.table, key=m.key), native, back)
            values = {f: v for f, v in values.items() if f not in back}
        row = rows[native]
        kept.update((f, (v, row.get(f))) for f, v in values.items())
        await engine.state.set_kept({(m.name, c["key"]): kept or None})
    await engine.sources[m.source].enqueue(m.table, [native])
    await engine.state.mark_conflict(conflict_id, f"manual_{keep}")
    return {**c, "status": "resolved", "resolution": f"manual_{keep}"}
