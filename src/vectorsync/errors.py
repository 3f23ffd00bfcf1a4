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
    "classify",
    "describe",
]


class VectorsyncError(Exception):
    """Base class of every error vectorsync raises on purpose.

    ``code`` carries the driver's structured code when there is one (SQLSTATE, HTTP status,
    SQLite error name), so classification never parses messages.
    """

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


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
        super().__init__(message, code=kind)
        if kind is not None:
            self.kind = kind


class RenderError(RecordError):
    """The record's text or payload could not be rendered from its row."""

    kind = "render"


class EmbeddingError(RecordError):
    """The embedder rejected the record's text."""

    kind = "embedding"


_VALIDATION_KINDS = {
    "empty_text",
    "text_too_long",
    "invalid_utf8",
    "payload_type",
    "payload_value",
    "invalid_key",
}


def classify(exc: BaseException) -> tuple[str, str | None]:
    """(error type, structured code) for the error log, from the exception's type and fields:
    connection, timeout, validation, render, embedding, sink or unknown."""
    code = getattr(exc, "code", None)
    if isinstance(exc, RecordError):
        if exc.kind in _VALIDATION_KINDS:
            return "validation", exc.kind
        return (exc.kind if exc.kind in ("render", "embedding") else "sink"), exc.kind
    if isinstance(exc, TimeoutError) or isinstance(exc.__cause__, TimeoutError):
        return "timeout", code
    if isinstance(exc, SinkError):
        return "sink", code
    if isinstance(exc, SourceError | RetryableError | ConnectionError):
        return "connection", code
    if isinstance(exc, ConfigError):
        return "validation", code
    return "unknown", code


def describe(exc: BaseException) -> str:
    """One line naming an error: its message (its type when the message is empty, as a
    timeout's often is), then each cause's type and message."""
    parts = [str(exc).strip() or type(exc).__name__]
    cause, seen = exc.__cause__ or exc.__context__, {id(exc)}
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        text = str(cause).strip()
        if text and text not in parts[0]:
            parts.append(f"{type(cause).__name__}: {text}")
        elif not text:
            parts.append(type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    return "; caused by ".join(parts)
