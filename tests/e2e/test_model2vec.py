"""A model2vec model distilled from the bundled MiniLM by the CLI syncs the demo's records
and answers searches; the CLI refuses what cannot work, naming the option or field."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from vectorsync.demo import CONFIG, DDL, QUERIES, _insert, stdlib_symbols
from vectorsync.embed.sentence_transformers import bundled_model_path


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vectorsync", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def demo_app(folder: Path, model: Path, records: int = 3000) -> tuple[Path, int]:
    """The demo's SQLite database and config, with the model2vec embedder."""
    with warnings.catch_warnings():  # reading typing.io's docstring warns (Python 3.11)
        warnings.simplefilter("ignore", DeprecationWarning)
        rows = list(stdlib_symbols(records))
    db = sqlite3.connect(folder / "app.db")
    db.execute(DDL)
    _insert(db, rows)
    db.commit()
    db.close()
    config = CONFIG.format(embedder="model2vec").replace(
        'kind = "model2vec"', f'kind = "model2vec"\npath = "{model}"'
    )
    (folder / "vectorsync.toml").write_text(config)
    return folder / "vectorsync.toml", len(rows)


@pytest.mark.embedding_model
@pytest.mark.slow
def test_a_distilled_model_syncs_the_demo_records_and_finds_them(
    tmp_path: Path, model2vec_folder: Path
) -> None:
    toml, records = demo_app(tmp_path, model2vec_folder)
    done = cli("run", "--once", "-c", str(toml), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"{records} embedded" in done.stderr
    status = cli("status", "--json", "-c", str(toml), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    [m] = json.loads(status.stdout)["mappings"]
    assert m["records"] == records
    # the demo's queries a static model answers well (bench/bench_model2vec.py measures all)
    for query, module in [(QUERIES[1], "subprocess"), (QUERIES[2], "gzip")]:
        found = cli("search", "stdlib", query, "-n", "10", "--json", "-c", str(toml), cwd=tmp_path)
        assert found.returncode == 0, found.stderr
        keys = [hit["key"] for hit in json.loads(found.stdout)["hits"]]
        assert len(keys) == 10 and any(k.startswith(f"{module}.") for k in keys), keys


@pytest.mark.embedding_model
@pytest.mark.slow
def test_distill_refuses_a_model2vec_folder_as_its_source(
    tmp_path: Path, model2vec_folder: Path
) -> None:
    done = cli("models", "distill", "--from", str(model2vec_folder), "--out", "x", cwd=tmp_path)
    assert done.returncode == 2 and "already a model2vec model" in done.stderr
    assert not (tmp_path / "x").exists()


def test_a_missing_model2vec_folder_is_refused_before_anything_is_created(
    tmp_path: Path,
) -> None:
    toml, _ = demo_app(tmp_path, tmp_path / "no-such-model", records=5)
    done = cli("run", "--once", "-c", str(toml), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "embedders.default.path" in done.stderr and "does not exist" in done.stderr
    assert "vectorsync models distill --from" in done.stderr
    assert not (tmp_path / ".vectorsync").exists()


def test_a_folder_that_is_not_a_model2vec_model_is_refused_naming_the_field(
    tmp_path: Path,
) -> None:
    toml, _ = demo_app(tmp_path, bundled_model_path(), records=5)  # a MiniLM folder
    done = cli("run", "--once", "-c", str(toml), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "embedders.default.path" in done.stderr and "not a model2vec one" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--from", "missing", "--out", "m2v"], "--from 'missing' does not exist"),
        (["--from", "{model}", "--out", "exists"], "--out 'exists' already exists"),
        (["--from", "{model}", "--out", "m2v", "--dims", "500"], "more than the 384 dimensions"),
        (["--from", "exists", "--out", "m2v"], "is not a sentence-transformers model folder"),
    ],
)
def test_distill_refuses_what_cannot_work_naming_the_option(
    tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "exists").mkdir()
    args = [a.replace("{model}", str(bundled_model_path())) for a in args]
    done = cli("models", "distill", *args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in " ".join(done.stderr.split()), done.stderr
    assert not (tmp_path / "m2v").exists()
