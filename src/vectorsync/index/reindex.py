"""Zero-downtime re-index: reconcile a mapping's index versions with its config, build the
next version beside the live one, verify it, swap the collection name over to it, keep the
previous one for a rollback, drop it when its time is up.

The sink's alias (a Qdrant alias; a symbolic link for qdrant-edge) makes the mapping's
collection name follow the live version; ``engine.search`` reads the live version directly.
Record state moves between names in the state store in the same order: see versions.py.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, PermanentError
from ..model import Key
from ..sinks.base import Sink
from ..state.store import StateStore
from .versions import IndexVersion, state_name

__all__ = ["INDEX_KEYS", "Versions", "reconcile", "verify_vectors"]

logger = logging.getLogger(__name__)

# what a mapping's vectors are made of: a change here is a new index version
INDEX_KEYS = ("model", "dimension", "distance", "text", "chunking")


@dataclass(frozen=True, slots=True, kw_only=True)
class Versions:
    live: IndexVersion
    building: IndexVersion | None = None
    previous: IndexVersion | None = None

    @property
    def all(self) -> list[IndexVersion]:
        return [v for v in (self.live, self.building, self.previous) if v is not None]


def physical(alias: str, number: int | str) -> str:
    return f"{alias}__v{number}"


async def reconcile(
    state: StateStore,
    sink: Sink,
    mapping: str,
    alias: str,
    *,
    digest: str,
    definition: Mapping[str, Any],
    legacy: tuple[str, Mapping[str, Any]] | None,
    auto: bool,
) -> Versions:
    """The mapping's versions, made to agree with what the config asks for (``digest``):
    a first version (adopting a collection written before versions existed, ``legacy`` =
    its digest and definition), a version to build when the config's differs from the live
    one (``auto``; otherwise it waits for ``vectorsync reindex``), a superseded build dropped."""
    found = [v for v in await state.index_versions(mapping) if v.state != "dropped"]
    live = next((v for v in found if v.state == "live"), None)
    if live is None:
        live = await _first(state, sink, mapping, alias, digest, definition, legacy)
    building = next((v for v in found if v.state == "building"), None)
    previous = next((v for v in found if v.state == "previous"), None)
    if building is not None and building.digest != digest:
        logger.info(
            "mapping %s: version %d being built is superseded by the config; dropping it",
            mapping,
            building.version,
            extra={"action": "index_superseded", "mapping": mapping},
        )
        await drop(state, sink, mapping, building)
        building = None
    rolled_back = previous is not None and previous.digest == digest
    if building is None and live.digest != digest and auto and not rolled_back:
        building = await start_build(state, mapping, alias, digest, definition)
    if rolled_back and building is None and live.digest != digest:
        logger.warning(
            "mapping %s: version %d (the config's) was rolled back; version %d stays live "
            "until `vectorsync reindex %s` or a config change",
            mapping,
            previous.version if previous else 0,
            live.version,
            mapping,
            extra={"action": "index_rolled_back", "mapping": mapping},
        )
    return Versions(live=live, building=building, previous=previous)


async def start_build(
    state: StateStore, mapping: str, alias: str, digest: str, definition: Mapping[str, Any]
) -> IndexVersion:
    version = await state.add_index_version(
        mapping,
        digest=digest,
        collection=physical(alias, "{n}"),
        state="building",
        definition=definition,
    )
    logger.info(
        "mapping %s: building index version %d in %s beside the live one",
        mapping,
        version.version,
        version.collection,
        extra={"action": "reindex_started", "mapping": mapping, "version": version.version},
    )
    return version


async def _first(
    state: StateStore,
    sink: Sink,
    mapping: str,
    alias: str,
    digest: str,
    definition: Mapping[str, Any],
    legacy: tuple[str, Mapping[str, Any]] | None,
) -> IndexVersion:
    """Version 1: the collection written before versions existed (kept where it is, under
    the mapping's collection name), or a new one named ``<collection>__v1`` with the name
    an alias of it."""
    if legacy is not None and alias in await sink.collections():
        old_digest, old_definition = legacy
        return await state.add_index_version(
            mapping, digest=old_digest, collection=alias, state="live", definition=old_definition
        )
    return await state.add_index_version(
        mapping,
        digest=digest,
        collection=physical(alias, "{n}"),
        state="live",
        definition=definition,
        backfill_done=True,
    )


async def point_alias(sink: Sink, alias: str, live: IndexVersion) -> None:
    """Make the collection name point at the live version (nothing to do while the live
    version is a collection of that very name, written before versions existed)."""
    if live.collection == alias:
        return
    if await sink.alias_target(alias) != live.collection:
        await sink.set_alias(alias, live.collection)


async def swap(
    state: StateStore, sink: Sink, mapping: str, alias: str, live: IndexVersion, new: IndexVersion
) -> IndexVersion:
    """``new`` becomes live, ``live`` previous: state first (one transaction), then the
    alias. A collection of the alias's own name (from before versions) is first renamed to
    ``<name>__v<n>`` where the sink can; on a Qdrant server it cannot, so it is dropped
    right after the alias is free (readers by name miss it for that moment; the previous
    version is then not kept)."""
    old_collection = live.collection
    if old_collection == alias:
        moved = physical(alias, live.version)
        try:
            await sink.rename_collection(alias, moved)
        except PermanentError:
            logger.warning(
                "mapping %s: the sink cannot rename %s (a collection from before index "
                "versions): it is dropped so its name can point at version %d; no rollback "
                "to it is possible",
                mapping,
                alias,
                new.version,
                extra={"action": "index_legacy_drop", "mapping": mapping},
            )
            await sink.drop_collection(alias)
            moved = ""
        if moved:
            await state.set_index_collection(mapping, live.version, moved)
            live = _moved(live, moved)
    await state.swap_index(mapping, live, new)
    await sink.set_alias(alias, new.collection)
    logger.info(
        "mapping %s: index version %d is live (%s); version %d kept as previous",
        mapping,
        new.version,
        new.collection,
        live.version,
        extra={"action": "index_swapped", "mapping": mapping, "version": new.version},
    )
    [now_live] = [v for v in await state.index_versions(mapping) if v.version == new.version]
    return now_live


def _moved(v: IndexVersion, collection: str) -> IndexVersion:
    from dataclasses import replace

    return replace(v, collection=collection)


async def drop(state: StateStore, sink: Sink, mapping: str, version: IndexVersion) -> None:
    """Delete a version's collection and state (never the live one)."""
    if version.state == "live":
        raise PermanentError(f"mapping {mapping!r}: version {version.version} is live")
    await sink.drop_collection(version.collection)
    await state.forget_index_state(state_name(mapping, version))
    await state.set_index_state(mapping, version.version, "dropped")


async def drop_expired(
    state: StateStore, sink: Sink, mapping: str, keep_seconds: float
) -> list[int]:
    """Drop previous versions kept longer than ``keep_seconds``."""
    now = time.time()
    dropped = []
    for v in await state.index_versions(mapping):
        if v.state == "previous" and (v.retired_at or now) + keep_seconds <= now:
            await drop(state, sink, mapping, v)
            dropped.append(v.version)
    return dropped


def parse_duration(text: str) -> float:
    """``24h``, ``30m``, ``90s``, ``2d`` or plain seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    raw = text.strip().lower()
    try:
        if raw and raw[-1] in units:
            return float(raw[:-1]) * units[raw[-1]]
        return float(raw)
    except ValueError:
        raise ConfigError(
            f"sync.keep_previous {text!r}: give a duration such as 24h, 30m, 90s or 2d"
        ) from None


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


async def verify_vectors(
    texts: Mapping[Key, str],
    stored: Mapping[Key, Sequence[float]],
    embed: Any,
    *,
    sample: int = 20,
    seed: int = 0,
) -> list[Key]:
    """Keys (of a sample) whose stored vector is not a fresh embedding of their text."""
    keys = sorted((k for k in stored if k in texts), key=str)
    chosen = random.Random(seed).sample(keys, min(sample, len(keys)))
    if not chosen:
        return []
    fresh = await embed([texts[k] for k in chosen])
    return [k for k, v in zip(chosen, fresh, strict=True) if cosine(v, stored[k]) < 0.999]
