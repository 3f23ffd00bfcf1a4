"""The index versions of an engine's mappings, as sync targets: which versions a mapping
writes (live, the one being built, the previous one), their runtimes, their backfills; the
verification and swap when a build is done; dry runs, rollbacks and listings.

The engine owns the adapters; this service turns a mapping's versions into what the sync
pipeline writes (one ``MappingRuntime`` per version) and runs the re-index flow.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson
import xxhash
from pydantic import TypeAdapter

from ..backoff import retrying
from ..check import Checker
from ..chunking import chunker_for, chunking_definition
from ..config import ChunkingConfig, EmbedderConfig, MappingConfig
from ..conflicts import layout_for
from ..embed.base import Embedder
from ..embed.named import layout_of, stored_layout
from ..errors import ConfigError, PermanentError, RecordError
from ..events import IndexSwapped, ReindexStarted
from ..model import Key, content_hash, key_text, point_id
from ..render import Renderer
from ..sinks.base import CollectionSpec
from .backfill import Backfill
from .reindex import (
    INDEX_KEYS,
    Versions,
    drop_expired,
    parse_duration,
    point_alias,
    reconcile,
    verify_vectors,
)
from .reindex import start_build as _start_build
from .reindex import swap as _swap
from .versions import IndexVersion, state_name

if TYPE_CHECKING:
    from ..engine import Engine
    from ..worker import MappingRuntime

__all__ = ["IndexService", "index_definition"]

logger = logging.getLogger(__name__)
_EMBEDDER = TypeAdapter(EmbedderConfig)
VERIFY_ATTEMPTS = 3  # verifications of one build in one run before the run gives up


def _digest(value: Any) -> str:
    return xxhash.xxh3_64_hexdigest(orjson.dumps(value, option=orjson.OPT_SORT_KEYS))


def index_definition(m: MappingConfig, embedder: Embedder, embedder_cfg: Any) -> dict[str, Any]:
    """What one index version's vectors are made of (its digest: ``INDEX_KEYS``), and the
    embedder settings that make them again."""
    definition = {
        "model": embedder.model_id,
        "dimension": embedder.dimension,
        "distance": embedder.distance,
        "text": m.text,
        "embedder": None if embedder_cfg is None else embedder_cfg.model_dump(mode="json"),
    }
    chunking = chunking_definition(m.chunking, embedder_cfg)
    if chunking is not None:  # absent otherwise: versions made before chunking stay valid
        definition["chunking"] = chunking
    layout = layout_for(m, embedder)
    if layout:  # likewise: named vectors (embed.named), keep_both's (conflicts)
        definition["vectors"] = [dataclasses.asdict(v) for v in layout]
    if m.conflicts == "keep_both":  # its points have named vectors: a version of its own
        definition["keep_both"] = True
    return definition


def version_config(m: MappingConfig, definition: Mapping[str, Any]) -> MappingConfig:
    """``m`` as an index version was made: its text template and chunking."""
    update: dict[str, Any] = {}
    text = str(definition.get("text", m.text))
    if text != m.text:
        update["text"] = text
    chunking = definition.get("chunking")
    made = None
    if chunking:
        made = ChunkingConfig.model_validate(
            {k: v for k, v in chunking.items() if k not in ("measure", "tokenizer")}
        )
    if made != m.chunking:
        update["chunking"] = made
    return m.model_copy(update=update) if update else m


def index_digest(definition: Mapping[str, Any]) -> str:
    made = {k: definition.get(k) for k in INDEX_KEYS if k != "chunking"}
    if definition.get("keep_both"):  # absent otherwise: older versions keep their digest
        made["keep_both"] = True
    chunking = definition.get("chunking")
    if chunking:
        made["chunking"] = {k: v for k, v in chunking.items() if k != "tokenizer"}
    return _digest(made)


@dataclass(slots=True)
class _Verdict:
    """A verification's findings, and what to repair before the backfill runs again."""

    problems: list[str] = field(default_factory=list)
    rewrite: list[Key] = field(default_factory=list)  # records to write anew
    stray: list[str] = field(default_factory=list)  # point ids the build did not write


@dataclass(slots=True)
class _Mapped:
    versions: Versions
    runtimes: list[MappingRuntime]


class IndexService:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.keep_previous = parse_duration(engine.config.sync.keep_previous)
        self._mapped: dict[str, _Mapped] = {}
        self._backfills: dict[tuple[str, int], Backfill] = {}
        self._embedders: dict[str, Embedder] = {}  # built for versions of other models
        self._failed: dict[tuple[str, int], int] = {}  # verifications failed, per build

    # -- targets ------------------------------------------------------------------------
    async def targets(
        self, m: MappingConfig, legacy: Mapping[str, Any] | None
    ) -> list[MappingRuntime]:
        """The runtimes the sync writes for ``m``: its live version first, then the one
        being built and the previous one (each maintained while it exists)."""
        e = self.engine
        embedder = e.embedders[m.embedder]
        definition = index_definition(m, embedder, e.config.embedders.get(m.embedder))
        digest = index_digest(definition)
        sink = e.sinks[m.sink]
        await drop_expired(e.state, sink, m.name, self.keep_previous)
        versions = await reconcile(
            e.state,
            sink,
            m.name,
            m.collection_name,
            digest=digest,
            definition=definition,
            legacy=None if legacy is None else (index_digest(legacy), legacy),
            auto=e.config.sync.reindex == "auto",
        )
        if versions.building is not None and versions.building.backfilled == 0:
            e.emit(
                ReindexStarted(
                    mapping=m.name,
                    version=versions.building.version,
                    collection=versions.building.collection,
                    reason=_reason(versions.live.definition, versions.building.definition),
                )
            )
        runtimes = []
        for version in versions.all:
            runtime = await self._runtime(m, version)
            if runtime is not None:
                runtimes.append(runtime)
        await point_alias(sink, m.collection_name, versions.live)
        self._mapped[m.name] = _Mapped(versions=versions, runtimes=runtimes)
        return runtimes

    def versions(self, mapping: str) -> Versions | None:
        mapped = self._mapped.get(mapping)
        return None if mapped is None else mapped.versions

    async def embedder_for(self, m: MappingConfig, version: IndexVersion) -> Embedder | None:
        """The embedder that makes ``version``'s vectors: the configured one, or one built
        again from the settings the version recorded (None when that is not possible)."""
        current = self.engine.embedders[m.embedder]
        if version.model == current.model_id:
            return current
        if version.model in self._embedders:
            return self._embedders[version.model]
        stored = version.definition.get("embedder")
        if not stored:
            return None
        from ..engine import build_embedder

        cfg = _EMBEDDER.validate_python(stored)
        embedder = build_embedder(f"{m.embedder}@v{version.version}", cfg, self.engine.config)
        try:
            await embedder.open()
        except ConfigError as exc:
            logger.warning(
                "mapping %s: index version %d's embedder cannot be made again (%s): that "
                "version is not written until it is replaced",
                m.name,
                version.version,
                exc,
                extra={"action": "index_embedder", "mapping": m.name},
            )
            return None
        if embedder.model_id != version.model:
            return None
        self._embedders[version.model] = embedder
        self.engine.keep_open(embedder)
        return embedder

    async def _runtime(self, m: MappingConfig, version: IndexVersion) -> MappingRuntime | None:
        from ..worker import MappingRuntime

        e = self.engine
        embedder = await self.embedder_for(m, version)
        if embedder is None:
            return None
        cfg = version_config(m, version.definition)
        indexes = e.index_types(m)
        sink = e.sinks[m.sink]
        spec = CollectionSpec(
            name=version.collection,
            dimension=embedder.dimension,
            distance=embedder.distance,
            indexes={**indexes, "_vs_key": "keyword" if e.is_text_key(m) else "integer"},
            vectors=stored_layout(version.definition) or layout_of(embedder),
        )
        await retrying(
            f"{m.sink}: open collection {spec.name}",
            partial(sink.ensure_collection, spec),
            e.backoff,
        )
        runtime = MappingRuntime(
            config=cfg,
            renderer=Renderer(cfg, indexes),
            embedder=embedder,
            sink=sink,
            schema_version=_digest(
                e.sync_part(cfg, embedder.model_id, embedder.dimension, embedder.distance)
            ),
            digest_columns=e.digest_columns(cfg),
            int_key=e.int_key(m),
            relations=e.relations(m),
            resolve=e.resolver(m),
            state_name=state_name(m.name, version),
            collection_name=version.collection,
            version=version.version,
            chunker=chunker_for(version.definition.get("chunking")),
        )
        if version.state == "building" and not version.backfill_done:
            key = (m.name, version.version)
            if key not in self._backfills:
                total = (await e.state.mapping_counts(m.name)).records
                self._backfills[key] = Backfill(
                    target=runtime,
                    after=version.backfill_after,
                    done=version.backfilled,
                    total=max(total, version.backfilled) or None,
                    budget=e.config.sync.batch_size,
                )
            else:
                self._backfills[key].target = runtime
        return runtime

    def expiring(self, source: str) -> bool:
        """Whether a previous version of ``source``'s mappings was kept for
        ``sync.keep_previous`` already (a streaming run then drops it: see ``targets``)."""
        now = time.time()
        e = self.engine
        return any(
            (previous := mapped.versions.previous) is not None
            and (previous.retired_at or now) + self.keep_previous <= now
            and e.mapping(name).source == source
            for name, mapped in self._mapped.items()
        )

    def backfills(self, source: str) -> list[Backfill]:
        return [bf for bf in self._backfills.values() if bf.target.config.source == source]

    # -- verify and swap ------------------------------------------------------------------
    async def backfilled(self, bf: Backfill) -> list[MappingRuntime] | None:
        """Every page of ``bf`` is committed (and nothing is in flight): verify the new
        version; if it holds, swap it live. If not, what failed is repaired (points the
        build did not write are removed, records that differ are written again by a new
        backfill) — at most ``VERIFY_ATTEMPTS`` times, then the run fails with the reason
        while the live version keeps serving. The runtimes the source's worker goes on
        with."""
        e = self.engine
        key = (bf.mapping, bf.version)
        self._backfills.pop(key, None)
        m = e.mapping(bf.mapping)
        versions = self._mapped[m.name].versions
        building = versions.building
        if building is None or building.version != bf.version:
            return None
        verdict = await self.verify(m, building, bf.target)
        if verdict.problems:
            attempts = self._failed.get(key, 0) + 1
            self._failed[key] = attempts
            reason = "; ".join(verdict.problems)
            if attempts >= VERIFY_ATTEMPTS:
                raise PermanentError(
                    f"mapping {m.name!r}: index version {building.version} did not verify "
                    f"{attempts} times ({reason}); version {versions.live.version} stays live. "
                    f"`vectorsync check {m.name}` shows the live version's drift; a config "
                    "change builds another version, `vectorsync reindex` tries this one again"
                )
            logger.warning(
                "mapping %s: index version %d did not verify (%s); repaired, its backfill "
                "runs again",
                m.name,
                building.version,
                reason,
                extra={"action": "reindex_verify", "mapping": m.name},
            )
            await self._repair(bf.target, verdict)
            await e.state.reset_backfill(m.name, building.version)
        else:
            self._failed.pop(key, None)
            await self.swap(m, versions.live, building)
        return await e.source_targets(m.source)

    async def _repair(self, target: MappingRuntime, verdict: _Verdict) -> None:
        """Remove the points that failed and forget their record state: the backfill that
        runs again writes each record that has a row anew."""
        ids = [*verdict.stray, *(point_id(target.config.family, k) for k in verdict.rewrite)]
        if ids:
            await target.sink.delete(target.collection, ids)
        if verdict.rewrite:
            await self.engine.state.forget(target.name, [key_text(k) for k in verdict.rewrite])

    async def verify(
        self, m: MappingConfig, building: IndexVersion, target: MappingRuntime
    ) -> _Verdict:
        """What keeps the new version from going live: a full check against the source
        (drift the live version shares is a change still in flight, not the new version's;
        a point the build has no record of is its own), and a sample of its vectors against
        fresh embeddings of their texts."""
        e = self.engine
        checker = self.checker(m, target)
        report = await checker.full()
        verdict = _Verdict()
        own = [d for d in report.drift if d.key is not None and d.category != "dead_lettered"]
        if own:
            keys = [key_text(d.key) for d in own if d.key is not None]
            live = await e.state.version_digests(m.name, keys)
            built = await e.state.version_digests(target.name, keys)
            real = [
                d.key
                for d in own
                if d.key is not None
                and (
                    live.get(key_text(d.key)) != built.get(key_text(d.key))
                    or (d.category == "orphaned" and key_text(d.key) not in built)
                )
            ]
            if real:
                verdict.rewrite.extend(real)
                verdict.problems.append(
                    f"{len(real)} records differ from the source (e.g. {real[0]!r})"
                )
        foreign = [d.point_id for d in report.drift if d.key is None]
        if foreign:
            verdict.stray.extend(foreign)
            verdict.problems.append(f"{len(foreign)} foreign points in the new collection")
        wrong = await self._sample_vectors(m, target)
        if wrong:
            verdict.rewrite.extend(wrong)
            verdict.problems.append(f"{len(wrong)} sampled vectors differ from fresh embeddings")
        return verdict

    async def _sample_vectors(self, m: MappingConfig, target: MappingRuntime) -> list[Key]:
        """Keys of a sample of the new version's points whose vector is not a fresh
        embedding of their current text (those whose text changed meanwhile left out)."""
        e = self.engine
        sample = [
            r
            async for r in target.sink.scroll(target.collection, with_vectors=True, page=256)
            if "_vs_key" in r.payload
        ][:200]
        keys = {r.id: r.payload["_vs_key"] for r in sample}
        texts = await e.texts(m.name, list(dict.fromkeys(keys.values())), text=target.config.text)
        own: dict[Key, str] = {}  # point id → the text its vector embeds (a chunk's: its span)
        for r in sample:
            text = texts.get(keys[r.id])
            if text is not None and "chunk_start" in r.payload:
                text = text[r.payload["chunk_start"] : r.payload["chunk_end"]]
            if text is not None and content_hash(target.embedder.model_id, text) == r.payload.get(
                "_vs_text_hash"
            ):
                own[r.id] = text
        stored: dict[Key, list[float]] = {r.id: r.vector or [] for r in sample}
        wrong = await verify_vectors(own, stored, target.embedder.embed)
        return list(dict.fromkeys(keys[str(pid)] for pid in wrong))

    def checker(self, m: MappingConfig, target: MappingRuntime) -> Checker:
        e = self.engine
        return Checker(
            mapping=m.name,
            source=e.sources[m.source],
            table=m.table,
            key=m.key,
            renderer=target.renderer,
            sink=target.sink,
            collection=target.collection,
            payload_fields=m.payload,
            model_id=target.embedder.model_id,
            schema_version=target.schema_version,
            state=e.state,
            digest_columns=target.digest_columns,
            resolve=target.resolve,
            state_name=target.name,
            chunker=target.chunker,
            family=m.family,
            select=m.row_filter,
        )

    async def swap(self, m: MappingConfig, live: IndexVersion, new: IndexVersion) -> None:
        e = self.engine
        await _swap(e.state, e.sinks[m.sink], m.name, m.collection_name, live, new)
        e.emit(
            IndexSwapped(
                mapping=m.name,
                version=new.version,
                previous=live.version,
                collection=new.collection,
            )
        )

    # -- commands -------------------------------------------------------------------------
    async def start_build(self, m: MappingConfig) -> IndexVersion:
        """``vectorsync reindex``: build the configured version again beside the live one
        (or go on with the one being built)."""
        e = self.engine
        found = {v.state: v for v in await e.state.index_versions(m.name)}
        if "building" in found:
            return found["building"]
        embedder = e.embedders[m.embedder]
        await embedder.open()
        e.keep_open(embedder)
        definition = index_definition(m, embedder, e.config.embedders.get(m.embedder))
        digest = index_digest(definition)
        previous, live = found.get("previous"), found.get("live")
        if previous is not None and live is not None and previous.digest == digest:
            await self.swap(m, live, previous)  # rolled back before: forward again, at once
            return previous
        return await _start_build(e.state, m.name, m.collection_name, digest, definition)

    async def dry_run(self, m: MappingConfig) -> dict[str, Any]:
        """What building ``m``'s configured version would cost, changing nothing: records,
        texts to embed, texts the embedding cache already has, estimated tokens (counted by
        an API embedder's tokenizer, else a text's characters / 4), the cost at the
        embedder's price, and time at its rate measured on a few of them."""
        e = self.engine
        embedder = e.embedders[m.embedder]
        await embedder.open()  # names the model; its weights load only to measure the rate
        e.keep_open(embedder)
        definition = index_definition(m, embedder, e.config.embedders.get(m.embedder))
        live = next((v for v in await e.state.index_versions(m.name) if v.state == "live"), None)
        renderer = Renderer(m, e.index_types(m))
        chunker = chunker_for(definition.get("chunking"))
        resolve = e.resolver(m)
        records = unrenderable = 0
        texts: dict[str, str] = {}
        page: dict[Any, dict[str, Any]] = {}
        source = e.sources[m.source]

        async def plan(rows: dict[Any, dict[str, Any]]) -> int:
            if resolve is not None and rows:
                await resolve(rows)
            bad = 0
            for row in rows.values():
                try:
                    text = renderer.render(row).text
                    pieces = [c.text for c in chunker.split(text)] if chunker else [text]
                except RecordError:
                    bad += 1
                    continue
                for piece in pieces:  # a chunked mapping embeds each chunk
                    texts.setdefault(content_hash(embedder.model_id, piece), piece)
            return bad

        async for row in source.scan(m.table, m.key, page=2000):
            records += 1
            page[row[m.key]] = row
            if len(page) >= 2000:
                unrenderable += await plan(page)
                page = {}
        unrenderable += await plan(page)
        cached = await e.state.cached_hashes(embedder.model_id, list(texts))
        needed = [t for h, t in texts.items() if h not in cached]
        rate = await _rate(embedder, needed[:16]) if needed else None
        counter = getattr(embedder, "counter", None)  # an API embedder counts its tokens
        if counter is not None:
            tokens = sum(counter.count(t) for t in needed)
        else:
            tokens = sum(len(t) for t in needed) // 4
        price = getattr(embedder, "price_per_million_tokens", None)
        return {
            "mapping": m.name,
            "version_changes": live is None or live.digest != index_digest(definition),
            "live_version": None if live is None else live.version,
            "records": records,
            "unrenderable": unrenderable,
            "texts": len(texts),
            "to_embed": len(needed),
            "from_cache": len(texts) - len(needed),
            "estimated_tokens": tokens,
            "embed_rate": rate,
            "estimated_seconds": None if not rate else round(len(needed) / rate, 1),
            "estimated_cost": None if price is None else round(tokens / 1e6 * price, 4),
            "model": embedder.model_id,
            "dimension": embedder.dimension,
        }

    async def rollback(self, m: MappingConfig) -> IndexVersion:
        """Make the previous version live again (it was maintained, so it is current)."""
        e = self.engine
        found = {v.state: v for v in await e.state.index_versions(m.name)}
        previous, live = found.get("previous"), found.get("live")
        if previous is None or live is None:
            raise ConfigError(
                f"mapping {m.name!r} has no previous index version to roll back to "
                "(`vectorsync indexes` lists them; a previous one is kept for "
                "sync.keep_previous after a swap)"
            )
        await self.swap(m, live, previous)
        return previous

    async def listing(self, mapping: str | None = None) -> list[dict[str, Any]]:
        e = self.engine
        rows = []
        for v in await e.state.index_versions(mapping):
            records = 0
            if v.state != "dropped":
                records = (await e.state.mapping_counts(state_name(v.mapping, v))).records
            rows.append(
                {
                    "mapping": v.mapping,
                    "version": v.version,
                    "collection": v.collection,
                    "state": v.state,
                    "records": records,
                    "model": v.model,
                    "dimension": v.dimension,
                    "created_at": v.created_at,
                    "live_at": v.live_at,
                    "dropped_at": v.dropped_at,
                    "retired_at": v.retired_at,
                    "backfill": {"done": v.backfill_done, "records": v.backfilled},
                }
            )
        return rows


async def _rate(embedder: Embedder, texts: list[str]) -> float:
    """Texts per second of ``embedder`` on a few texts (after one warm-up call)."""
    await embedder.embed(texts[:1])
    started = time.monotonic()
    await embedder.embed(texts)
    return len(texts) / max(time.monotonic() - started, 1e-6)


def _reason(live: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    changed = [k for k in INDEX_KEYS if live.get(k) != new.get(k)]
    return ", ".join(changed) or "asked"
