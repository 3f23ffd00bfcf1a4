"""The state store: positions, record state, schema registry, dead letters, embedding cache."""

from .store import BatchCommit, DeadLetter, MappingCounts, StateStore

__all__ = ["BatchCommit", "DeadLetter", "MappingCounts", "StateStore"]
