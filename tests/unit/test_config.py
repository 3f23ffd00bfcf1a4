from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vectorsync import ConfigError, parse_config
from vectorsync.config import load_config

BASE: dict[str, Any] = {
    "sources": {"app": {"kind": "sqlite", "path": "app.db"}},
    "sinks": {"vectors": {"kind": "qdrant-edge"}},
    "embedders": {"default": {"kind": "hash"}},
    "mappings": [
        {"name": "a", "source": "app", "table": "t", "text": "{{ x }}", "sink": "vectors"}
    ],
}


def test_defaults_and_relative_paths() -> None:
    cfg = parse_config(BASE, base_dir=Path("/srv/proj"))
    assert cfg.state_url() == "sqlite:////srv/proj/.vectorsync/state.db"
    assert cfg.mappings[0].collection_name == "a" and cfg.mappings[0].key == "id"
    assert cfg.resolve(Path("app.db")) == Path("/srv/proj/app.db")


def test_env_overrides_values_by_path() -> None:
    env = {
        "VECTORSYNC_SYNC__BATCH_SIZE": "17",
        "VECTORSYNC_SOURCES__APP__PATH": "/x/y.db",
        "VECTORSYNC_CONFIG": "ignored.toml",
    }
    cfg = parse_config(BASE, environ=env)
    assert cfg.sync.batch_size == 17
    assert str(cfg.sources["app"].path) == "/x/y.db"


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"sinks": {"vectors": {"kind": "pinecone"}}}, "sinks.vectors"),
        ({"sinks": {"vectors": {"kind": "qdrant"}}}, "set exactly one of url"),
        ({"sinks": {"vectors": {"kind": "chroma"}}}, "set exactly one of path (a folder"),
        (
            {"sinks": {"vectors": {"kind": "chroma", "path": "c", "url": "http://h:8000"}}},
            "set exactly one of path",
        ),
        (
            {"sinks": {"vectors": {"kind": "chroma", "url": "localhost:8000"}}},
            "not a Chroma server address; use http://host:port",
        ),
        (
            {"sinks": {"vectors": {"kind": "chroma", "url": "http://h:8000/api/v2"}}},
            "not a Chroma server address",
        ),
        (
            {
                "sinks": {"vectors": {"kind": "chroma", "path": "c"}},
                "mappings": [{**BASE["mappings"][0], "collection": "_x"}],
            },
            "mappings[0] ('a'): collection '_x' cannot be a Chroma collection of sink 'vectors': "
            "Chroma needs 3-512",
        ),
        (
            {"sinks": {"vectors": {"kind": "chroma", "path": "c"}}},  # mapping 'a': too short
            "collection 'a' cannot be a Chroma collection",
        ),
        (
            {"sinks": {"vectors": {"kind": "falkordb", "url": "http://h:6379"}}},
            "sinks.vectors.falkordb: url must start with redis://",
        ),
        (
            {
                "sinks": {"vectors": {"kind": "falkordb"}},
                "mappings": [{**BASE["mappings"][0], "collection": "VectorsyncAlias"}],
            },
            "collection 'VectorsyncAlias' cannot be a node label of sink 'vectors': the label "
            "'VectorsyncAlias' is vectorsync's own",
        ),
        ({"embedders": {"default": {"kind": "hash", "dimension": 0}}}, "dimension"),
        ({"mappings": []}, "mappings"),
        (
            {"mappings": [{**BASE["mappings"][0], "sink": "nope"}]},
            "mappings[0] ('a').sink: unknown sink 'nope' (defined: vectors)",
        ),
        ({"mappings": [BASE["mappings"][0], BASE["mappings"][0]]}, "duplicate mapping name"),
        ({"colour": "blue"}, "colour: unknown field"),
    ],
)
def test_errors_name_the_field(patch: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, **patch})
    assert message in str(info.value)


def test_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[state\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
