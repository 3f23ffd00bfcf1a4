"""The qdrant-edge sink's folder: one shard folder per collection, a symlink per alias.

qdrant-edge has no aliases, so an alias is a symbolic link ``<path>/<alias>`` whose
relative target is the collection's folder name. A swap writes a new link under a hidden
temporary name and renames it over the old one (``rename(2)`` is atomic), then fsyncs the
folder: a reader resolving the name sees the old collection or the new one, never neither.
Names starting with a dot are ours (the lock, links and folders in flight).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from ..errors import PermanentError

_LINK, _DROPPED = ".link", ".dropped"


def physical(path: Path) -> set[str]:
    """The collection folders (not links, not ours)."""
    return {p.name for p in _entries(path) if not p.is_symlink() and p.is_dir()}


def links(path: Path) -> dict[str, str]:
    """Each alias and the collection it names."""
    return {p.name: os.readlink(p) for p in _entries(path) if p.is_symlink()}


def link_target(path: Path, name: str) -> str | None:
    try:
        return os.readlink(path / name)
    except OSError:  # missing, or not a link
        return None


def check_plain(sink: str, name: str) -> None:
    """A name must be one folder entry of our own kind."""
    if not name or name.startswith(".") or "/" in name or "\0" in name:
        raise PermanentError(
            f"sink {sink!r}: {name!r} cannot name a collection or alias here: it is stored as "
            "a folder entry, so it needs a non-empty name without '/' that does not start with '.'"
        )


def swap_link(path: Path, alias: str, collection: str) -> None:
    temporary = path / f".{alias}.{uuid.uuid4().hex}{_LINK}"
    os.symlink(collection, temporary)
    try:
        os.replace(temporary, path / alias)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(path)


def rename(path: Path, old: str, new: str) -> None:
    os.rename(path / old, path / new)
    fsync_dir(path)


def remove(path: Path, name: str) -> None:
    """Delete a collection's folder: first out of sight in one rename, then its files, so a
    crash midway leaves no half-deleted collection (``sweep`` finishes the job)."""
    folder = path / name
    if not folder.exists():
        return
    trash = path / f".{name}.{uuid.uuid4().hex}{_DROPPED}"
    os.rename(folder, trash)
    fsync_dir(path)
    shutil.rmtree(trash)


def sweep(path: Path) -> None:
    """Remove what an interrupted swap or drop left behind."""
    for p in path.glob(".*"):
        if p.is_symlink() and p.name.endswith(_LINK):
            p.unlink(missing_ok=True)
        elif p.is_dir() and p.name.endswith(_DROPPED):
            shutil.rmtree(p, ignore_errors=True)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _entries(path: Path) -> list[Path]:
    with contextlib.suppress(FileNotFoundError):
        return [p for p in path.iterdir() if not p.name.startswith(".")]
    return []
