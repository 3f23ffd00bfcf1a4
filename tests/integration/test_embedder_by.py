"""A model per kind of record (embedder_by): each embedder chosen is a copy of the mapping
with its own collection; a record whose field changes moves between them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import App, check, load, write_config
from vectorsync.embed.hash import HashEmbedder
from vectorsync.engine import Engine
from vectorsync.errors import ConfigError

BY_TAG = 'embedder_by = { field = "tags", map = { event = "temporal", default = "default" } }'


def _config(workdir: Path) -> Path:
    cfg = write_config(workdir, extra_mapping=BY_TAG)
    text = cfg.read_text().replace(
        "[[mappings]]", '[embedders.temporal]\nkind = "hash"\ndimension = 64\n[[mappings]]', 1
    )
    cfg.write_text(text)
    return cfg


async def test_each_kind_of_record_is_embedded_by_its_model_in_its_collection(
    workdir: Path, app: App
) -> None:
    for k in range(1, 21):
        app.insert(k, tags="event" if k % 4 == 0 else "note")
    cfg = _config(workdir)
    config = load(cfg)
    names = {m.name: (m.embedder, m.collection_name) for m in config.mappings}
    assert names == {
        "articles": ("default", "articles"),
        "articles.temporal": ("temporal", "articles_temporal"),
    }
    default, temporal = HashEmbedder("default"), HashEmbedder("temporal", dimension=64)
    embedders = {"default": default, "temporal": temporal}
    async with Engine.open(config, embedders=embedders) as engine:
        await engine.run(once=True)
    assert (default.texts_embedded, temporal.texts_embedded) == (15, 5)
    await check(cfg, app)  # each collection holds exactly its rows, with its vectors
    app.update(1, tags="event")  # moves to the temporal collection
    app.update(4, tags="note")  # and back
    app.update(8, body="an event's new body")
    async with Engine.open(config, embedders=embedders) as engine:
        await engine.run(once=True)
        status = {s.mapping: s.records for s in await engine.status()}
    assert (default.texts_embedded, temporal.texts_embedded) == (16, 7)
    assert status == {"articles": 15, "articles.temporal": 5}
    await check(cfg, app)
    async with Engine.open(config, embedders=embedders) as engine:
        for name in ("articles", "articles.temporal"):  # each copy checks only its rows
            for mode in ("full", "prove", "quick", "sample"):
                report = await engine.check(name, mode=mode)
                assert report.consistent, (name, mode, report.counts)


def test_an_unknown_embedder_in_the_map_is_refused_naming_it(workdir: Path) -> None:
    cfg = write_config(workdir, extra_mapping=BY_TAG)  # no [embedders.temporal]
    with pytest.raises(ConfigError, match="unknown embedder 'temporal'"):
        load(cfg)
