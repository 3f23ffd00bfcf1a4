"""Sinks: stores we write derived state into."""

from .base import CollectionSpec, Distance, Hit, IndexType, Sink

__all__ = ["CollectionSpec", "Distance", "Hit", "IndexType", "Sink"]
