"""model2vec embedder: a static model (one vector per token, averaged), made offline from a
sentence-transformers model by :func:`distill` (``vectorsync models distill``).

No torch at run time and no network to run: a text's vector is the mean of its tokens'
vectors (of its first 512 tokens, counted when there are more), so it embeds thousands of
texts a second on one core. It ranks worse than the model
it was distilled from (bench/results/embed-model2vec.json measures how much worse).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, EmbeddingError
from ..sinks.base import Distance
from ._files import declared_dimension, weights_digest
from .tokens import TokenCounter

__all__ = ["DEFAULT_DIMS", "Model2VecEmbedder", "check_model2vec_folder", "distill"]

logger = logging.getLogger(__name__)

DEFAULT_DIMS = 256  # PCA dimensions of a distilled model (model2vec's own default)
_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_MAKE_ONE = "make one with: vectorsync models distill --from <sentence-transformers folder> --out "


def check_model2vec_folder(field: str, folder: Path) -> None:
    """ConfigError naming ``field`` unless ``folder`` holds a model2vec model."""
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise ConfigError(f"{field}: {str(folder)!r} {what}; {_MAKE_ONE}{str(folder)!r}")
    missing = [f for f in _FILES if not (folder / f).is_file()]
    if missing:
        raise ConfigError(
            f"{field}: {str(folder)!r} is not a model2vec model folder (no {', '.join(missing)}); "
            f"{_MAKE_ONE}{str(folder)!r}"
        )
    try:
        kind = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind != "model2vec":
        raise ConfigError(
            f"{field}: {str(folder)!r} holds a {kind or 'unknown'} model, not a model2vec one "
            "(its config.json says model_type = " + json.dumps(kind) + "); give a folder made "
            "by vectorsync models distill"
        )


class Model2VecEmbedder:
    distance: Distance = "cosine"

    def __init__(self, name: str, *, path: str, batch_size: int = 1024) -> None:
        self.name = name
        self.path = Path(path)
        self.batch_size = batch_size
        self._model: Any = None
        self._lock = asyncio.Lock()  # model2vec re-arms its tokenizer's truncation per call
        self.counter: TokenCounter | None = None
        self.max_input_tokens: int | None = None
        self.model_id = ""
        self.dimension = 0
        self.texts_embedded = 0
        self.texts_truncated = 0

    async def open(self) -> None:
        """Load the model (15 MB for a distilled MiniLM: well under a second)."""
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        check_model2vec_folder(f"embedders.{self.name}.path", self.path)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from model2vec import StaticModel
        except ImportError as exc:
            raise ConfigError(
                f"embedder {self.name!r} (kind 'model2vec') needs the model2vec package: "
                "pip install 'vectorsync[model2vec]'"
            ) from exc
        self._model = StaticModel.from_pretrained(str(self.path))
        self.dimension = int(self._model.dim)
        self.max_input_tokens = self._model.max_length
        self.counter = TokenCounter(self.path.name, str(self.path))
        self.model_id = f"m2v:{self.path.name}@{weights_digest(self.path)}"
        logger.info(
            "embedder %s: model2vec %s, %d dimensions",
            self.name,
            self.path,
            self.dimension,
            extra={"action": "embedder_open", "model": self.model_id},
        )

    async def close(self) -> None:
        self._model = None

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        async with self._lock:
            vectors, truncated = await asyncio.to_thread(self._encode, list(texts))
        self.texts_embedded += len(texts)
        self.texts_truncated += truncated
        return vectors

    def _encode(self, texts: list[str]) -> tuple[list[list[float]], int]:
        import numpy as np

        assert self.counter is not None
        limit = self.max_input_tokens
        truncated = 0 if limit is None else self.counter.over(texts, limit)
        try:
            array = self._model.encode(
                texts, batch_size=self.batch_size, show_progress_bar=False, normalize=False
            )
        except (ValueError, TypeError, RuntimeError) as exc:
            raise EmbeddingError(f"model {self.model_id} rejected the text: {exc}") from exc
        # float16 weights: normalise in float32, or unit vectors are off by ~1e-3
        array = np.asarray(array, dtype=np.float32)
        norms = np.linalg.norm(array, axis=1, keepdims=True)
        if not norms.all():  # no token of the text is in the vocabulary (or it is empty)
            [i, *_] = np.flatnonzero(norms == 0)
            raise EmbeddingError(
                f"model {self.model_id} has no vector for the text {texts[i][:80]!r}: none of "
                "its tokens is in the model's vocabulary"
            )
        array /= norms
        result: list[list[float]] = array.tolist()
        return result, truncated


def distill(
    source: Path,
    out: Path,
    *,
    dims: int = DEFAULT_DIMS,
    force: bool = False,
    say: Callable[[str], None] = logger.info,
) -> Path:
    """Distil a model2vec model from the sentence-transformers folder ``source`` into
    ``out``, offline. ``out`` must not exist unless ``force`` (it is then replaced, once the
    new model is complete). Takes ~1 minute for MiniLM on 2 cores; model2vec shows its own
    progress bar (rate and ETA) over the vocabulary."""
    _check_source(source)
    if out.exists() and not force:
        raise ConfigError(
            f"--out {str(out)!r} already exists; choose another folder, or pass --force to "
            "replace it"
        )
    width = declared_dimension(source)
    if width is not None and dims > width:
        raise ConfigError(
            f"--dims {dims} is more than the {width} dimensions of {str(source)!r}; "
            f"choose --dims {width} or fewer"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from model2vec.distill import distill as model2vec_distill
        from transformers.utils import logging as transformers_logging
    except ImportError as exc:
        raise ConfigError(
            "vectorsync models distill needs model2vec and torch: pip install torch==2.13.0, "
            "then pip install 'vectorsync[model2vec]'"
        ) from exc
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    say(f"distilling {source} into {dims} dimensions (every token of its vocabulary) …")
    try:
        model = model2vec_distill(model_name=str(source), pca_dims=dims)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"--from {str(source)!r}: model2vec cannot distil it: {exc}") from exc
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(str(partial))
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    partial.rename(out)
    say(f"saved {out} ({_size(out)}, {model.dim} dimensions)")
    return out


def _check_source(source: Path) -> None:
    if not source.is_dir():
        what = "is a file" if source.exists() else "does not exist"
        raise ConfigError(
            f"--from {str(source)!r} {what}; give a local sentence-transformers model folder "
            "(models load offline only)"
        )
    if not (source / "config.json").is_file() or not (source / "tokenizer.json").is_file():
        raise ConfigError(
            f"--from {str(source)!r} is not a sentence-transformers model folder with a fast "
            "tokenizer (config.json and tokenizer.json); give the folder of such a model"
        )
    try:
        kind = json.loads((source / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind == "model2vec":
        raise ConfigError(
            f"--from {str(source)!r} is already a model2vec model; distil from the "
            "sentence-transformers model it was made from"
        )


def _size(folder: Path) -> str:
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return f"{total / 1e6:.0f} MB"
