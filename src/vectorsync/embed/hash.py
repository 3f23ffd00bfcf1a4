"""A deterministic feature-hashing embedder: fast and offline, for tests and benchmarks.

Texts sharing words get similar vectors, but it is not semantic: never use it for search.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import xxhash

from ..sinks.base import Distance

__all__ = ["HashEmbedder"]

_TOKEN = re.compile(r"\w+")


class HashEmbedder:
    distance: Distance = "cosine"

    def __init__(self, name: str = "hash", dimension: int = 384, batch_size: int = 256) -> None:
        self.name = name
        self.dimension = dimension
        self.batch_size = batch_size
        self.model_id = f"hash-v1/{dimension}"
        self.texts_embedded = 0

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.texts_embedded += len(texts)
        return [self.vector(t) for t in texts]

    def vector(self, text: str) -> list[float]:
        vec = [0.0] * self.dimension
        for token in _TOKEN.findall(text.lower()) or [text]:
            h = xxhash.xxh64_intdigest(token.encode())
            vec[h % self.dimension] += 1.0 if (h >> 63) else -1.0
        norm = math.sqrt(sum(x * x for x in vec)) or 1.0
        return [x / norm for x in vec]
