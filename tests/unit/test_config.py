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


def _several_sinks(**mapping: Any) -> dict[str, Any]:
    graph = {"kind": "falkordb", "url": "redis://127.0.0.1:6379"}
    common = {"source": "app", "text": "{{ x }}", "sinks": ["vectors", "graph"]}
    return {
        **BASE,
        "sinks": {**BASE["sinks"], "graph": graph},
        "mappings": [
            {"name": "authors", "table": "authors", **common},
            {"name": "articles", "table": "articles", **common, **mapping},
        ],
    }


def test_several_sinks_run_as_one_copy_per_sink_with_the_same_ids_and_collection() -> None:
    cfg = parse_config(_several_sinks(collection="docs"))
    copies = {m.name: (m.sink, m.collection_name, m.family) for m in cfg.mappings}
    assert copies == {
        "authors": ("vectors", "authors", "authors"),
        "authors.graph": ("graph", "authors", "authors"),
        "articles": ("vectors", "docs", "articles"),
        "articles.graph": ("graph", "docs", "articles"),
    }


def test_edges_of_a_several_sink_mapping_go_to_its_graph_copy() -> None:
    from vectorsync.sinks._graph_edges import edge_specs

    edges = [{"type": "WRITTEN_BY", "field": "author_id", "to": "authors"}]
    cfg = parse_config(_several_sinks(payload=["author_id"], edges=edges))
    [spec] = edge_specs(cfg, "graph")
    assert (spec.source, spec.type, spec.to) == ("articles", "WRITTEN_BY", "authors")


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"sink": "vectors"}, "not both"),
        ({"sinks": ["vectors", "vectors"]}, "names a sink twice"),
        ({"sinks": ["vectors", "nowhere"]}, "unknown sink 'nowhere'"),
    ],
)
def test_bad_sinks_are_refused_naming_the_fix(mapping: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(_several_sinks(**mapping))


SURREAL = {"kind": "surrealdb", "url": "ws://127.0.0.1:8000", "namespace": "app", "database": "kb"}


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"url": "http://127.0.0.1:8000"}, "url must start with ws://, wss://, mem://"),
        ({"retention": "a week"}, 'retention .*write a SurrealDB duration, e.g. "7d"'),
        ({"password": "pw"}, "password without username"),
        ({"namespace": ""}, "namespace"),
    ],
)
def test_bad_surrealdb_sources_are_refused_naming_the_fix(
    source: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({**BASE, "sources": {"app": {**SURREAL, **source}}})


def test_a_surrealdb_source_parses_with_its_defaults() -> None:
    src = parse_config({**BASE, "sources": {"app": {**SURREAL, "url": "surrealkv://kb"}}})
    cfg = src.sources["app"]
    assert (cfg.kind, getattr(cfg, "retention", None)) == ("surrealdb", "7d")
