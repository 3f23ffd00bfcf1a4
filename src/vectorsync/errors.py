"""One root, two branches: retry decisions use ``isinstance``, never message text."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "EmbeddingError",
    "PermanentError",
    "RecordError",
    "RenderError",
    "RetryableError",
    "SinkError",
    "SourceError",
    "VectorsyncError",
]


class VectorsyncError(Exception):
    """Base class of every error vectorsync raises on purpose."""


class RetryableError(VectorsyncError):
    """A transient failure (timeout, lost connection, lock, 5xx): a later retry may succeed."""


class PermanentError(VectorsyncError):
    """A failure that retrying cannot fix (bad record, bad config, schema mismatch)."""


class ConfigError(PermanentError):
    """The configuration is invalid; the message names the field and the fix."""


class SourceError(RetryableError):
    """The source database could not be read."""


class SinkError(RetryableError):
    """The sink did not acknowledge a write."""


class RecordError(PermanentError):
    """One record cannot be synced as it is; it goes to the dead-letter queue.

    ``kind`` is a stable machine-readable reason (``render``, ``empty_text``,
    ``text_too_long``, ``embedding``, ``sink_rejected``).
    """

    kind = "record"

    def __init__(self, message: str, *, kind: str | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class RenderError(RecordError):
    """The record's text or payload could not be rendered from its row."""

    kind = "render"


class EmbeddingError(RecordError):
    """The embedder rejected the record's text."""

    kind = "embedding"
