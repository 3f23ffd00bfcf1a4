"""vectorsync: keep vector stores continuously consistent with the database that owns the truth.

The names below load on first use, so that ``import vectorsync`` (and the CLI's start,
which installs its signal handlers before anything else) stays cheap."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Config, load_config, parse_config
    from .engine import Engine, MappingStatus, RunResult
    from .errors import (
        ConfigError,
        PermanentError,
        RecordError,
        RetryableError,
        VectorsyncError,
    )
    from .model import Change, Point, RecordState, SinkRecord, point_id

__all__ = [
    "Change",
    "Config",
    "ConfigError",
    "Engine",
    "MappingStatus",
    "PermanentError",
    "Point",
    "RecordError",
    "RecordState",
    "RetryableError",
    "RunResult",
    "SinkRecord",
    "VectorsyncError",
    "load_config",
    "parse_config",
    "point_id",
]

__version__ = "0.1.0"

_HOMES = {
    **dict.fromkeys(("Config", "load_config", "parse_config"), "config"),
    **dict.fromkeys(("Engine", "MappingStatus", "RunResult"), "engine"),
    **dict.fromkeys(
        ("ConfigError", "PermanentError", "RecordError", "RetryableError", "VectorsyncError"),
        "errors",
    ),
    **dict.fromkeys(("Change", "Point", "RecordState", "SinkRecord", "point_id"), "model"),
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'vectorsync' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
