"""One contract, every embedder: the hash embedder, the bundled MiniLM model, a model2vec
model distilled from it, and the openai embedder against a real OpenAI-compatible server
(infinity-emb serving MiniLM)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from vectorsync.embed.base import Embedder
from vectorsync.embed.hash import HashEmbedder
from vectorsync.embed.model2vec import Model2VecEmbedder
from vectorsync.embed.openai import OpenAIEmbedder
from vectorsync.embed.sentence_transformers import Device, SentenceTransformersEmbedder
from vectorsync.errors import ConfigError, EmbeddingError


@pytest.fixture(
    params=[
        "hash",
        pytest.param("minilm", marks=pytest.mark.embedding_model),
        pytest.param("model2vec", marks=[pytest.mark.embedding_model, pytest.mark.slow]),
        pytest.param("openai", marks=pytest.mark.embedding_server),
    ]
)
async def embedder(request: pytest.FixtureRequest) -> AsyncIterator[Embedder]:
    e: Embedder
    if request.param == "hash":
        e = HashEmbedder("hash")
    elif request.param == "openai":
        from tests.embedding_server import MODEL_NAME

        url = request.getfixturevalue("infinity_url")
        e = OpenAIEmbedder("openai", url=url, model=MODEL_NAME)
    elif request.param == "model2vec":
        e = Model2VecEmbedder("model2vec", path=str(request.getfixturevalue("model2vec_folder")))
    else:
        e = SentenceTransformersEmbedder("minilm", threads=1)
    await e.open()
    yield e
    await e.close()


async def test_vectors_are_deterministic_normalised_and_of_the_declared_dimension(
    embedder: Embedder,
) -> None:
    texts = ["json.loads parses a JSON document", "subprocess.run runs a command", "é ünïcode"]
    first = await embedder.embed(texts)
    again = await embedder.embed(list(reversed(texts)))
    assert len(first) == 3 and all(len(v) == embedder.dimension for v in first)
    assert all(math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-4) for v in first)
    for a, b in zip(first, reversed(again), strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    assert embedder.model_id and embedder.texts_embedded >= 6


@pytest.mark.embedding_model
async def test_minilm_is_semantic_and_pinned() -> None:
    e = SentenceTransformersEmbedder("minilm", threads=1)
    await e.open()
    q, near, far = await e.embed(
        [
            "read a JSON file",
            "parse JSON text into objects",
            "compress a directory into a tar archive",
        ]
    )
    cos = lambda a, b: sum(x * y for x, y in zip(a, b, strict=True))  # noqa: E731
    assert cos(q, near) > cos(q, far) + 0.2
    assert e.dimension == 384 and e.model_id.startswith("st:all-MiniLM-L6-v2@")
    await e.close()


@pytest.mark.embedding_model
def test_opening_minilm_loads_no_model_until_it_embeds() -> None:
    """A command that embeds nothing (status, a run with nothing new) never imports torch:
    the model's id and dimension come from its folder; its weights load at the first
    embed (in a fresh process, so no other test's import hides the difference)."""
    import subprocess
    import sys

    probe = (
        "import asyncio, sys\n"
        "from vectorsync.embed.sentence_transformers import SentenceTransformersEmbedder\n"
        "async def main():\n"
        "    e = SentenceTransformersEmbedder('minilm', threads=1)\n"
        "    await e.open()\n"
        "    assert not e.loaded and 'torch' not in sys.modules, sorted(sys.modules)\n"
        "    assert e.dimension == 384 and e.model_id.startswith('st:all-MiniLM-L6-v2@')\n"
        "    [v] = await e.embed(['hello'])\n"
        "    assert e.loaded and len(v) == 384\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.embedding_model
async def test_minilm_batches_side_by_side_give_the_library_s_vectors_in_order() -> None:
    """Texts of mixed length handed over at once: the embedder sorts them, cuts them into
    batches and runs two at a time; each vector is the one ``encode`` gives for its text."""
    from sentence_transformers import SentenceTransformer

    from vectorsync.embed.sentence_transformers import bundled_model_path

    texts = [f"text {i}: " + "word " * (i * 7 % 53) for i in range(40)]
    e = SentenceTransformersEmbedder("minilm", batch_size=4, threads=1, concurrency=2)
    await e.open()
    vectors = await e.embed(texts)
    await e.close()
    model = SentenceTransformer(str(bundled_model_path()), device="cpu")
    expected = model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    assert e.concurrency == 2 and e.texts_embedded == len(texts)
    for got, want in zip(vectors, expected.tolist(), strict=True):
        assert got == pytest.approx(want, abs=1e-5)


@pytest.mark.embedding_model
@pytest.mark.parametrize("device", ["cpu", "auto"])
async def test_minilm_runs_on_the_device_asked_for(device: Device) -> None:
    """``auto`` is the GPU where torch sees one, else the CPU (as on this machine)."""
    import torch

    e = SentenceTransformersEmbedder("minilm", threads=1, device=device)
    await e.open()
    [vector] = await e.embed(["read a JSON file"])
    expected = "cuda" if device == "auto" and torch.cuda.is_available() else "cpu"
    assert e.device == expected and len(vector) == 384
    assert str(e._model.device).startswith(expected)
    await e.close()


@pytest.mark.embedding_model
async def test_minilm_on_cuda_without_a_gpu_is_refused_at_open_naming_the_field() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: nothing to refuse")
    e = SentenceTransformersEmbedder("minilm", device="cuda")
    with pytest.raises(ConfigError, match=r'embedders\.minilm\.device: "cuda" .*no CUDA GPU'):
        await e.open()
    assert not e.loaded


@pytest.mark.embedding_model
async def test_minilm_counts_tokens_and_the_texts_its_window_cuts() -> None:
    """The library cuts a text to the model's 256 tokens without a word: counted here, as
    the API embedder counts (``vectorsync_embedder_truncated_total``)."""
    e = SentenceTransformersEmbedder("minilm", threads=1)
    await e.open()
    long_text = " ".join(f"word{i}" for i in range(600))
    await e.embed(["a short text", long_text, "another short one"])
    assert e.max_input_tokens == 256 and e.texts_truncated == 1
    await e.embed([" ".join(["word"] * 250)])  # 252 tokens with [CLS] and [SEP]: not cut
    assert e.texts_truncated == 1
    await e.close()


@pytest.mark.embedding_model
async def test_a_text_minilm_cuts_is_counted_in_stats_and_metrics(tmp_path: Path) -> None:
    """One over-long record synced end to end: the cut shows in ``stats`` and ``/metrics``."""
    from tests.helpers import App, load, write_config
    from vectorsync.engine import Engine
    from vectorsync.metrics import prometheus_text

    app = App(tmp_path / "app.db")
    app.insert(1, body=" ".join(f"word{i}" for i in range(600)))
    app.insert(2)
    config = write_config(tmp_path, embedder='kind = "sentence-transformers"\nconcurrency = 1')
    async with Engine.open(load(config)) as engine:
        await engine.run(once=True)
        counted = (await engine.stats())["embedders"]["default"]
        text = (await prometheus_text(engine)).decode()
    app.close()
    assert counted["texts"] == 2 and counted["truncated"] == 1
    assert 'vectorsync_embedder_truncated_total{embedder="default"} 1.0' in text
    assert 'vectorsync_embeddings_truncated_total{embedder="default"} 1.0' in text


@pytest.mark.embedding_model
@pytest.mark.slow
async def test_model2vec_counts_the_texts_it_cuts_and_names_a_text_it_has_no_vector_for(
    model2vec_folder: Path,
) -> None:
    e = Model2VecEmbedder("m2v", path=str(model2vec_folder))
    await e.open()
    assert e.dimension == 256 and e.max_input_tokens == 512
    assert e.model_id.startswith(f"m2v:{model2vec_folder.name}@")
    [short, long] = await e.embed(["read a JSON file", " ".join(["word"] * 600)])
    assert e.texts_truncated == 1 and len(short) == len(long) == 256
    with pytest.raises(EmbeddingError, match=r"no vector for the text '😀'"):
        await e.embed(["a text", "😀"])
    await e.close()
