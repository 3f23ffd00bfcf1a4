"""One contract, every embedder: the hash embedder, the bundled MiniLM model, and the
openai embedder against a real OpenAI-compatible server (infinity-emb serving MiniLM)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import pytest

from vectorsync.embed.base import Embedder
from vectorsync.embed.hash import HashEmbedder
from vectorsync.embed.openai import OpenAIEmbedder
from vectorsync.embed.sentence_transformers import SentenceTransformersEmbedder


@pytest.fixture(
    params=[
        "hash",
        pytest.param("minilm", marks=pytest.mark.embedding_model),
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
