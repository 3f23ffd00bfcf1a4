"""The local embedders' config: model2vec's path and sentence-transformers' device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_config import BASE
from vectorsync import ConfigError, parse_config
from vectorsync.config import Model2VecEmbedderConfig, SentenceTransformersEmbedderConfig
from vectorsync.embed.model2vec import Model2VecEmbedder
from vectorsync.embed.sentence_transformers import SentenceTransformersEmbedder
from vectorsync.engine import build_embedder


def _with(embedder: dict[str, Any]) -> dict[str, Any]:
    return {**BASE, "embedders": {"default": embedder}}


def test_a_model2vec_path_is_relative_to_the_config_s_folder() -> None:
    cfg = parse_config(_with({"kind": "model2vec", "path": "models/m2v"}), base_dir=Path("/p"))
    entry = cfg.embedders["default"]
    assert isinstance(entry, Model2VecEmbedderConfig) and entry.batch_size == 1024
    embedder = build_embedder("default", entry, cfg)
    assert isinstance(embedder, Model2VecEmbedder)  # built without loading anything
    assert embedder.batch_size == 1024 and embedder.path == Path("/p/models/m2v")


@pytest.mark.parametrize(
    ("embedder", "message"),
    [
        ({"kind": "model2vec"}, "embedders.default.model2vec.path"),
        ({"kind": "model2vec", "path": "m", "batch_size": 0}, "batch_size"),
        ({"kind": "sentence-transformers", "device": "gpu"}, "device"),
    ],
)
def test_errors_name_the_field(embedder: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_with(embedder))
    assert message in str(info.value)


@pytest.mark.parametrize("device", ["cpu", "cuda", "auto"])
def test_the_device_reaches_the_embedder(device: str) -> None:
    cfg = parse_config(_with({"kind": "sentence-transformers", "device": device}))
    entry = cfg.embedders["default"]
    assert isinstance(entry, SentenceTransformersEmbedderConfig)
    embedder = build_embedder("default", entry, cfg)
    assert isinstance(embedder, SentenceTransformersEmbedder) and embedder.device == device
