"""The embedder port."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from ..sinks.base import Distance

__all__ = ["Embedder", "Loadable", "Metered"]


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


@runtime_checkable
class Metered(Protocol):
    """An embedder billed by the token (an API): it says what each call used, so runs and
    mappings count their own tokens and cost."""

    price_per_million_tokens: float | None

    async def embed_metered(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        """``embed``, and the tokens the endpoint counted for it."""
        ...


@runtime_checkable
class Loadable(Protocol):
    """An embedder whose weights load at its first call: a process that will embed for
    long (a worker) loads them with :meth:`load` before it takes any work."""

    async def load(self) -> None:
        """Load the weights now (once per process; a no-op when loaded)."""
        ...
