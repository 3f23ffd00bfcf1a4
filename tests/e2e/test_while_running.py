"""Commands beside a streaming `vectorsync run`: search and check go through the running
process (its control socket), filters, readable hits, and commands that embed nothing never
load a model."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_cli import cli
from tests.helpers import App, wait_for, write_config

MINILM = '[embedders.default]\nkind = "sentence-transformers"\nthreads = 1'


@pytest.fixture
def streaming(workdir: Path, app: App) -> Iterator[list[str]]:
    """`vectorsync run` streaming on the project (hash embedder); its stderr lines."""
    app.insert(1, title="Password reset", body="Use the forgot-password link.", author="ann")
    app.insert(2, title="Billing", body="Invoices are sent monthly.", author="bob", published=2026)
    app.insert(3, title="Exports", body="Download a CSV of your data.", author="bob")
    write_config(workdir)
    lines: list[str] = []
    with subprocess.Popen(
        [sys.executable, "-m", "vectorsync", "run"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr or ()))
        reader.start()
        try:
            wait_for(lambda: proc.poll() is not None or "streaming" in "".join(lines), 120)
            assert proc.poll() is None, "".join(lines)
            yield lines
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            reader.join()
    assert proc.returncode == 0, "".join(lines)


def test_run_says_what_it_does_and_where(streaming: list[str], workdir: Path) -> None:
    said = "".join(streaming)
    assert "source app: sqlite app.db (trigger outbox capture)" in said
    assert "sink vectors: qdrant-edge .vectorsync/qdrant" in said
    assert "mapping articles: app.articles → vectors/articles" in said
    assert f"{workdir / '.vectorsync' / 'control.sock'}" in said
    assert "streaming; Ctrl-C stops" in said


def test_search_and_check_go_through_the_running_sync(
    streaming: list[str], workdir: Path, app: App
) -> None:
    wait_for(
        lambda: (
            json.loads(cli("status", "--json", cwd=workdir).stdout)["mappings"][0]["records"] == 3
        ),
        120,
    )
    found = cli("search", "articles", "Password reset", cwd=workdir)
    assert found.returncode == 0, found.stderr
    first, text = found.stdout.splitlines()[:2]
    assert first.split()[0] == "1." and first.split()[-1] == "1"  # rank, score, key
    assert "Use the forgot-password link." in text and "_vs_" not in found.stdout

    only_bob = cli("search", "articles", "x", "--where", "author=bob", "--json", cwd=workdir)
    hits = json.loads(only_bob.stdout)["hits"]
    assert sorted(h["key"] for h in hits) == [2, 3]
    assert all(not k.startswith("_vs_") for h in hits for k in h["payload"])
    recent = cli(
        "search",
        "articles",
        "x",
        "-w",
        "author=bob",
        "-w",
        "published>=2025",
        "--json",
        cwd=workdir,
    )
    assert [h["key"] for h in json.loads(recent.stdout)["hits"]] == [2]
    wrong = cli("search", "articles", "x", "--where", "nosuch=1", cwd=workdir)
    assert wrong.returncode == 2 and "not a payload field" in wrong.stderr

    checked = cli("check", "--json", cwd=workdir)
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["consistent"] is True
    app.update(2, author="cy")  # the stream applies it: the next search sees it
    wait_for(
        lambda: (
            [
                h["key"]
                for h in json.loads(
                    cli("search", "articles", "x", "-w", "author=cy", "--json", cwd=workdir).stdout
                )["hits"]
            ]
            == [2]
        ),
        120,
    )


def test_commands_that_embed_nothing_load_no_model(workdir: Path, app: App) -> None:
    """status, runs, dlq list with MiniLM configured never import torch (the model's id and
    dimension come from its folder, and only an embedding loads the weights)."""
    app.insert(1)
    cfg = write_config(workdir)
    cfg.write_text(cfg.read_text().replace('[embedders.default]\nkind = "hash"', MINILM))
    for args in (("status", "--json"), ("runs",), ("dlq", "list", "--status", "all")):
        done = cli(*args, "-v", cwd=workdir, env={"PYTHONVERBOSE": ""})
        assert done.returncode == 0, done.stderr
        assert "loading embedding model" not in done.stderr, args


def test_version_plurals_and_every_dead_letter_status(workdir: Path, app: App) -> None:
    version = cli("--version", cwd=workdir)
    assert version.returncode == 0 and version.stdout.startswith("vectorsync 0.")
    app.insert(1)
    app.insert(2, title=None, body=None)  # dead-lettered
    write_config(workdir)
    done = cli("run", "--once", cwd=workdir)
    assert "2 changes in" in done.stderr
    app.update(1, author="bob")
    again = cli("run", "--once", cwd=workdir)
    assert "1 change in" in again.stderr, again.stderr
    listed = json.loads(cli("dlq", "list", "--status", "all", "--json", cwd=workdir).stdout)
    assert [d["key"] for d in listed["dead_letters"]] == ["2"]
    bad = cli("dlq", "list", "--status", "everything", cwd=workdir)
    assert bad.returncode == 2 and "use pending, processing" in bad.stderr
    helped = cli("run", "--help", cwd=workdir)
    assert "([http] host/port)" in helped.stdout  # help is plain text, never markup


def test_maintain_goes_through_the_running_sync(streaming: list[str], workdir: Path) -> None:
    """The qdrant-edge folder has one writer: maintain runs inside the streaming process."""
    wait_for(
        lambda: (
            json.loads(cli("status", "--json", cwd=workdir).stdout)["mappings"][0]["records"] == 3
        ),
        120,
    )
    done = cli("maintain", "--json", cwd=workdir)  # opening the folder itself would fail
    assert done.returncode == 0, done.stderr
    [row] = json.loads(done.stdout)["maintained"]
    assert row["kind"] == "qdrant-edge" and row["mapping"] == "articles"
    assert isinstance(row["actions"], list) and row["size_after"] > 0
