"""vectorsync: keep vector stores continuously consistent with the database that owns the truth."""

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
