"""Several named vectors per point, as one embedder.

A mapping with ``[[mappings.vectors]]`` renders every vector's text into one text (joined
by ``SEPARATOR``) and embeds it with ``NamedVectors``: one vector that is the vectors'
concatenation, in declaration order. So the rest of the pipeline is unchanged — one content
hash per record (a change of any vector's text or model changes it), one index version (a
model change of one vector builds the next version) — and Qdrant sinks split the
concatenation into the named vectors of the collection's layout (``CollectionSpec.vectors``).

Each vector is embedded only when its own text changed: every vector's part is looked up in
the embedding cache by its own model and text hash first (and kept there once embedded), so
a title-only edit embeds the title again and takes the body's vector from the cache; an
index version that changes one vector's model embeds only that vector.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import RecordError
from ..model import SparseVector, content_hash
from ..sinks.base import Distance, VectorSpec
from .base import Embedder, Metered
from .sparse import SparseEncoder

__all__ = ["SEPARATOR", "NamedVectors", "VectorCache", "layout_of", "stored_layout"]

# Between the vectors' texts in a mapping's rendered text: the ASCII record separator,
# which a text to embed has no use for (a row value holding it is refused, see split).
SEPARATOR = "\x1e"


class VectorCache(Protocol):
    """Where vectors are kept by model and text hash (the state store's embedding cache)."""

    async def cached_vectors(self, model: str, hashes: Sequence[str]) -> dict[str, list[float]]: ...

    async def cache_vectors(self, model: str, vectors: Mapping[str, Sequence[float]]) -> None: ...


@dataclass(frozen=True, slots=True)
class Part:
    name: str
    embedder: Embedder

    @property
    def sparse(self) -> SparseEncoder | None:
        return self.embedder if isinstance(self.embedder, SparseEncoder) else None


class NamedVectors:
    """The embedder of a mapping with named vectors (see the module docstring)."""

    def __init__(
        self,
        name: str,
        parts: Sequence[tuple[str, Embedder]],
        *,
        max_chars: int,
        cache: VectorCache | None,
    ) -> None:
        if not parts:
            raise ValueError("named vectors need at least one vector")
        self.name = name
        self.parts = [Part(n, e) for n, e in parts]
        if self.parts[0].sparse is not None:
            raise ValueError("the first vector is the default for search: it must be dense")
        self.dense = [(i, p) for i, p in enumerate(self.parts) if p.sparse is None]
        self.sparse = [(i, p) for i, p in enumerate(self.parts) if p.sparse is not None]
        self.max_chars = max_chars  # each vector's text is cut to this (max_text_length)
        self.cache = cache  # None: every vector of a changed record is embedded again
        self.batch_size = min(p.embedder.batch_size for _, p in self.dense)
        self.texts_embedded = 0
        self.vectors_embedded = {p.name: 0 for p in self.parts}  # per vector, for status
        self._opened = False
        self._describe()

    def _describe(self) -> None:  # again once the parts are open: they know their models then
        inner = ",".join(f"{p.name}={p.embedder.model_id}" for p in self.parts)
        self.model_id = f"vectors({inner})"
        self.dimension = sum(p.embedder.dimension for _, p in self.dense)
        self.distance: Distance = self.parts[0].embedder.distance

    @property
    def layout(self) -> tuple[VectorSpec, ...]:
        """The named vectors of a point, in the order the concatenation holds them."""
        return tuple(
            VectorSpec(
                name=p.name,
                dimension=p.embedder.dimension,
                distance=p.embedder.distance,
                sparse=p.sparse is not None,
            )
            for p in self.parts
        )

    @property
    def price_per_million_tokens(self) -> float | None:
        """The price of the one metered vector embedder (None: none, or several prices —
        tokens are still counted; their cost is not)."""
        prices = {
            p.embedder.price_per_million_tokens
            for p in self.parts
            if isinstance(p.embedder, Metered)
        }
        return prices.pop() if len(prices) == 1 else None

    def part(self, name: str | None) -> Part:
        """The vector named ``name`` (None: the first, the default for search)."""
        if name is None:
            return self.parts[0]
        for p in self.parts:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.parts)
        raise KeyError(f"no vector {name!r} (vectors: {known})")

    async def open(self) -> None:
        if self._opened:
            return
        for p in self.parts:
            await p.embedder.open()
        self._describe()
        self._opened = True

    async def close(self) -> None:
        return None  # the parts are the engine's configured embedders: it closes them

    def split(self, text: str) -> list[str]:
        """A rendered text's vector texts, each cut to ``max_chars``."""
        pieces = text.split(SEPARATOR)
        if len(pieces) != len(self.parts):
            raise RecordError(
                f"the text of a vector holds the character U+001E (record separator), which "
                f"separates the vectors' texts ({len(pieces)} pieces for {len(self.parts)} "
                "vectors); remove it from the row",
                kind="invalid_text",
            )
        return [p[: self.max_chars] for p in pieces]

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        vectors, _ = await self.embed_metered(texts)
        return vectors

    async def embed_metered(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        split = [self.split(t) for t in texts]
        out: list[list[float]] = [[] for _ in texts]
        tokens = 0
        for i, p in self.dense:
            model = p.embedder.model_id
            hashes = [content_hash(model, s[i]) for s in split]
            found = await self.cache.cached_vectors(model, hashes) if self.cache else {}
            wanted = {h: s[i] for h, s in zip(hashes, split, strict=True) if h not in found}
            if wanted:
                made, used = await _embed(p.embedder, list(wanted.values()))
                tokens += used
                new = dict(zip(wanted, made, strict=True))
                if self.cache is not None:
                    await self.cache.cache_vectors(model, new)
                found.update(new)
                self.vectors_embedded[p.name] += len(wanted)
            for j, h in enumerate(hashes):
                out[j].extend(found[h])
        self.texts_embedded += len(texts)
        return out, tokens

    def sparse_vectors(self, text: str) -> dict[str, SparseVector]:
        """A rendered text's sparse vectors by name (made at each write: tokenizing is
        cheap beside a model, and nothing is kept)."""
        if not self.sparse:
            return {}
        pieces = self.split(text)
        return {p.name: enc.document(pieces[i]) for i, p in self.sparse if (enc := p.sparse)}


def layout_of(embedder: Embedder) -> tuple[VectorSpec, ...]:
    """The named vectors ``embedder`` makes (empty: one unnamed vector)."""
    return embedder.layout if isinstance(embedder, NamedVectors) else ()


def stored_layout(definition: Mapping[str, object]) -> tuple[VectorSpec, ...]:
    """The named vectors of an index version, from its definition (``vectors``)."""
    found = definition.get("vectors") or ()
    assert isinstance(found, list | tuple)
    return tuple(VectorSpec(**v) for v in found)


async def _embed(embedder: Embedder, texts: list[str]) -> tuple[list[list[float]], int]:
    if isinstance(embedder, Metered):
        return await embedder.embed_metered(texts)
    return await embedder.embed(texts), 0
