"""Metrics: components keep plain counters and histograms; the Prometheus exporter is one
adapter that reads them at scrape time (psycopg_pool's ``get_stats`` style)."""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS", "Histogram", "prometheus_text"]

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


@dataclass(slots=True)
class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics), cheap to observe."""

    bounds: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, n in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


@dataclass(slots=True)
class SourceStats:
    """Cumulative counters of one source's pipeline, kept across runs of an engine."""

    captured: int = 0
    mappings: dict[str, dict[str, int]] = field(default_factory=dict)
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    batch_sizes: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))


async def prometheus_text(engine: Engine) -> bytes:
    """The engine's stats in the Prometheus text format."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )
    from prometheus_client.registry import Collector

    stats = {
        **await engine.stats(),
        "collection_sizes": await engine.collection_sizes(),
        "sink_backlog": await engine.state.backlog_counts(),
    }

    class _Snapshot(Collector):
        def collect(self) -> Iterator[Any]:
            yield from _families(
                stats, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
            )

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot())
    return generate_latest(registry)


_OPERATIONS = ("upserted", "payload_only", "deleted", "skipped", "failed")


def _families(stats: dict[str, Any], counter: Any, gauge: Any, histogram: Any) -> Iterator[Any]:
    captured = counter(
        "vectorsync_changes_captured", "Changes read from a source", labels=["source"]
    )
    for source, s in stats["sources"].items():
        captured.add_metric([source], s["captured"])
    yield captured
    applied = counter(
        "vectorsync_changes_applied",
        "Records applied, by operation",
        labels=["mapping", "operation"],
    )
    embeddings = counter(
        "vectorsync_embeddings", "Texts embedded or not", labels=["mapping", "result"]
    )
    for mapping, m in stats["mappings"].items():
        for op in _OPERATIONS:
            applied.add_metric([mapping, op], m.get(op, 0))
        embeddings.add_metric([mapping, "computed"], m.get("embedded", 0))
        embeddings.add_metric([mapping, "cached"], m.get("cache_hits", 0))
        embeddings.add_metric([mapping, "skipped"], m.get("payload_only", 0) + m.get("skipped", 0))
    yield applied
    yield embeddings
    writes = counter(
        "vectorsync_sink_writes", "Points written to sinks", labels=["mapping", "operation"]
    )
    for mapping, m in stats["mappings"].items():
        writes.add_metric([mapping, "upsert"], m.get("upserted", 0))
        writes.add_metric([mapping, "payload"], m.get("payload_only", 0))
        writes.add_metric([mapping, "delete"], m.get("deleted", 0) + m.get("chunks_deleted", 0))
    yield writes
    chunks = counter(
        "vectorsync_chunks", "Chunks cut from the records written in full", labels=["mapping"]
    )
    per_record = gauge(
        "vectorsync_chunks_per_record",
        "Mean chunks of the records written in full (chunked mappings)",
        labels=["mapping"],
    )
    for mapping, m in stats["mappings"].items():
        if m.get("chunks"):
            written = m.get("inserted", 0) + m.get("updated", 0)
            chunks.add_metric([mapping], m["chunks"])
            per_record.add_metric([mapping], m["chunks"] / max(written, 1))
    yield chunks
    yield per_record
    tokens = counter(
        "vectorsync_mapping_tokens", "Tokens API embedders billed for a mapping", labels=["mapping"]
    )
    cost = counter(
        "vectorsync_mapping_cost",
        "Cost of a mapping's tokens, at its embedder's price",
        labels=["mapping"],
    )
    for mapping, m in stats["mappings"].items():
        if m.get("tokens"):
            tokens.add_metric([mapping], m["tokens"])
            cost.add_metric([mapping], m.get("cost_micros", 0) / 1e6)
    yield tokens
    yield cost
    conflicts = counter(
        "vectorsync_conflicts",
        "Points others edited in the sink (the conflict log), by the mapping's policy and the "
        'resolution ("open": found by a check, not synced yet)',
        labels=["mapping", "policy", "resolution"],
    )
    for mapping, policy, resolution, n in stats.get("conflicts", ()):
        conflicts.add_metric([mapping, policy, resolution], n)
    yield conflicts
    for key, name, doc in (
        ("texts", "vectorsync_embedder_texts", "Texts an embedder embedded in this process"),
        ("tokens", "vectorsync_embedder_tokens", "Tokens sent to an API embedder"),
        ("truncated", "vectorsync_embedder_truncated", "Texts cut to the model's window"),
        # the same count under the name the embedders issue gave it
        ("truncated", "vectorsync_embeddings_truncated", "Texts cut to the model's window"),
        ("rate_limited", "vectorsync_embedder_rate_limited", "429 answers waited out"),
        ("cost", "vectorsync_embedder_cost", "Cost of the tokens sent, at the configured price"),
    ):
        family = counter(name, doc, labels=["embedder"])
        for embedder, e in stats["embedders"].items():
            if key in e:
                family.add_metric([embedder], e[key])
        yield family
    yield from _scaleout(stats.get("scaleout"), gauge)
    errors = counter("vectorsync_errors", "Errors logged, by type", labels=["type"])
    for kind, n in stats["errors_by_type"].items():
        errors.add_metric([kind], n)
    yield errors
    yield gauge("vectorsync_dead_letters", "Dead letters pending", value=stats["dead_letters"])
    sizes = gauge(
        "vectorsync_collection_size_bytes",
        "Bytes a mapping's live collection takes in its sink (on disk; FalkorDB: in memory)",
        labels=["mapping"],
    )
    for mapping, size in stats["collection_sizes"].items():
        sizes.add_metric([mapping], size)
    yield sizes
    behind = gauge(
        "vectorsync_sink_backlog",
        "Records a sink of a several-sink mapping was not written while it was down",
        labels=["mapping"],
    )
    for mapping, n in stats["sink_backlog"].items():
        behind.add_metric([mapping], n)
    yield behind
    for name, doc in (
        ("lag_seconds", "Age of the oldest unapplied change"),
        ("lag_changes", "Changes committed but not applied"),
        ("position", "Source position fully applied"),
        ("queue_depth", "Batches waiting between pipeline stages"),
    ):
        g = gauge(f"vectorsync_{name}", doc, labels=["source"])
        for source, s in stats["sources"].items():
            g.add_metric([source], s[name] or 0)
        yield g
    latency = histogram(
        "vectorsync_sync_latency_seconds",
        "Source commit to sink acknowledgement",
        labels=["source"],
    )
    batches = histogram("vectorsync_batch_size", "Changes per batch", labels=["source"])
    for source, s in stats["sources"].items():
        for family, h in ((latency, s["latency"]), (batches, s["batch_sizes"])):
            family.add_metric([source], h.cumulative(), sum_value=h.total)
    yield latency
    yield batches
    consistent = gauge(
        "vectorsync_last_check_consistent",
        "1 when the last consistency check found no drift",
        labels=["mapping"],
    )
    drift = gauge(
        "vectorsync_last_check_drift",
        "Records in each drift category, last check",
        labels=["mapping", "category"],
    )
    for mapping, check in stats["checks"].items():
        consistent.add_metric([mapping], int(check["consistent"]))
        for category, n in check["counts"].items():
            drift.add_metric([mapping, category], n)
    yield consistent
    yield drift


def _scaleout(scaled: dict[str, Any] | None, gauge: Any) -> Iterator[Any]:
    """Scale-out mode: the capture per source, the workers alive, each partition's depth
    (entries not yet applied) and whether a worker holds it."""
    if not scaled or "error" in scaled:
        return
    capture = gauge(
        "vectorsync_capture_active", "1 while a capture holds the source", labels=["source"]
    )
    for source, holder in scaled["capture"].items():
        capture.add_metric([source], 1 if holder else 0)
    yield capture
    yield gauge(
        "vectorsync_workers_alive", "Workers beating their lease", value=len(scaled["workers"])
    )
    depth = gauge(
        "vectorsync_bus_depth",
        "Entries of a bus partition not yet applied",
        labels=["source", "partition"],
    )
    held = gauge(
        "vectorsync_partition_held",
        "1 while a worker holds the partition",
        labels=["source", "partition"],
    )
    for source, parts in scaled["partitions"].items():
        for p, v in parts.items():
            depth.add_metric([source, str(p)], v["depth"])
            held.add_metric([source, str(p)], 1 if v["worker"] else 0)
    yield depth
    yield held
