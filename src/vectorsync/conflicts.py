"""Conflicts: points whose payload was edited in the sink by someone else, and the policy
that resolves them (see docs/conflicts.md).

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
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .config import MappingConfig
from .errors import ConfigError
from .model import Key
from .sources.base import TableSpec, WritesBack

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["Conflict", "Kept", "Resolution", "Resolver", "apply_kept", "resolve_manually"]

Policy = Literal["source_wins", "latest_wins", "merge"]
# field → (the sink's value kept, the source's value when it was kept)
Kept = dict[str, tuple[Any, Any]]
_MISSING: Any = object()


@dataclass(frozen=True, slots=True, kw_only=True)
class Conflict:
    """One conflict as logged: per field, the base, source and sink values and the result."""

    mapping: str
    key: str
    policy: str
    resolution: str  # source_written | sink_kept | merged | detected (by a check)
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
        values = {f: v["sink"] for f, v in c["fields"].items()}  # what the other side wrote
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
