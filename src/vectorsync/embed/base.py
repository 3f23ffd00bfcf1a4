"""The embedder port."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ..sinks.base import Distance

__all__ = ["Embedder"]


class Embedder(Protocol):
    """Turns texts into vectors. ``model_id`` names the exact weights: it is part of every
    content hash, so a model change re-embeds and an unchanged model never does."""

    name: str
    model_id: str
    dimension: int
    distance: Distance
    batch_size: int
    texts_embedded: int

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text, in order; EmbeddingError names a text the model rejects."""
        ...
