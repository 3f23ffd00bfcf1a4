"""Sparse vectors for hybrid search: term frequencies over a model's tokenizer.

A document is the token ids of its text with a saturated term frequency each (BM25's
``tf · (k1 + 1) / (tf + k1)``, without length normalisation); a query is its distinct token
ids, 1.0 each. The sink weighs terms by their rarity: Qdrant's ``idf`` modifier on the
sparse vector computes inverse document frequencies over the collection as it is, so
nothing corpus-wide is computed or kept here, and a new record never re-weights others.
Only used as a named vector of a mapping (embed.named), beside a dense one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import xxhash

from ..errors import PermanentError
from ..model import SparseVector
from ..sinks.base import Distance
from .tokens import load_tokenizer

__all__ = ["SparseEncoder"]

_K1 = 1.2  # BM25's usual saturation: the 2nd occurrence of a term adds less than the 1st


class SparseEncoder:
    """``kind = "sparse"``: see the module docstring. ``tokenizer`` is a model folder
    holding ``tokenizer.json`` (default: the bundled MiniLM's)."""

    distance: Distance = "dot"
    dimension = 0  # sparse: as many dimensions as the tokenizer has tokens

    def __init__(self, name: str, *, tokenizer: str | None = None, batch_size: int = 1024):
        self.name = name
        self.batch_size = batch_size
        self.texts_embedded = 0
        self._folder = tokenizer
        self._tok: object | None = None
        self.model_id = f"sparse-tf/{_K1}"

    async def open(self) -> None:
        if self._tok is not None:
            return
        if self._folder is None:
            from .sentence_transformers import bundled_model_path

            folder = bundled_model_path()
        else:
            folder = Path(self._folder)
        path = folder / "tokenizer.json" if folder.is_dir() else folder
        fix = "set tokenizer to a model folder that has one"
        self._tok = load_tokenizer(folder, f"embedder {self.name!r}", fix)
        # the token ids are the vector's dimensions: another vocabulary is another model
        vocabulary = xxhash.xxh3_64_hexdigest(path.read_bytes())
        self.model_id = f"sparse-tf/{_K1}/{vocabulary}"

    async def close(self) -> None:
        return None

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        raise PermanentError(
            f"embedder {self.name!r} makes sparse vectors: use it as a vector of a mapping's "
            "[[mappings.vectors]], beside a dense one"
        )

    def _ids(self, text: str) -> list[int]:
        from tokenizers import Tokenizer

        assert isinstance(self._tok, Tokenizer), "open() the encoder first"
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def document(self, text: str) -> SparseVector:
        """A record's text as token ids and their saturated frequencies."""
        counts = sorted(Counter(self._ids(text)).items())
        self.texts_embedded += 1
        return SparseVector(
            indices=[i for i, _ in counts],
            values=[tf * (_K1 + 1) / (tf + _K1) for _, tf in counts],
        )

    def query(self, text: str) -> SparseVector:
        """A search text as its distinct token ids, 1.0 each."""
        ids = sorted(set(self._ids(text)))
        return SparseVector(indices=ids, values=[1.0] * len(ids))
