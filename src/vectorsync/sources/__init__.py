"""Sources: databases that own the truth and emit changes."""

from .base import Backlog, Source, TableSpec

__all__ = ["Backlog", "Source", "TableSpec"]
