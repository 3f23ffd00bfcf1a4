"""Counting (and cutting) texts in a model's tokens, for every embedder that has a window:
batches by tokens, truncation counted rather than silent."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["TokenCounter", "load_tokenizer"]

_CHARS_PER_TOKEN = 4  # the documented estimate when no tokenizer is known
_SPECIAL_TOKENS_MARGIN = 8  # [CLS], [SEP], <s>, </s> and the like: never more than a few


def load_tokenizer(folder: Path, what: str, fix: str) -> Tokenizer:
    """A model folder's ``tokenizer.json`` (or that file), counting whole texts (a bundled
    one may truncate and pad); ConfigError naming ``what`` and the ``fix`` otherwise."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json" if folder.is_dir() else folder
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise ConfigError(
            f"{what}: cannot load a tokenizer.json from {str(folder)!r} ({exc}); {fix}"
        ) from exc
    tok.no_truncation()
    tok.no_padding()
    return tok


class TokenCounter:
    """Counts (and cuts) texts in the model's tokens: a local ``tokenizer.json`` folder,
    tiktoken's encoding for an OpenAI model name, else 1 token per 4 characters."""

    def __init__(self, model: str, tokenizer: str | None) -> None:
        self.kind = "estimate"
        self._count: Callable[[str], int] = _estimate
        self._cut: Callable[[str, int], str] = lambda text, limit: text[: limit * _CHARS_PER_TOKEN]
        if tokenizer is not None:
            self._from_folder(Path(tokenizer))
        else:
            self._from_tiktoken(model)

    def _from_folder(self, folder: Path) -> None:
        path = folder / "tokenizer.json" if folder.is_dir() else folder
        tok = load_tokenizer(
            folder,
            "tokenizer",
            "give a model folder with tokenizer.json, or leave tokenizer out to estimate",
        )

        def cut(text: str, limit: int) -> str:
            offsets = tok.encode(text, add_special_tokens=False).offsets
            return text if len(offsets) <= limit else text[: offsets[limit - 1][1]]

        self.kind = f"tokenizer.json ({path})"
        self._count = lambda text: len(tok.encode(text).ids)
        self._cut = cut

    def _from_tiktoken(self, model: str) -> None:
        try:
            import tiktoken

            encoding = tiktoken.encoding_for_model(model)
            encoding.encode("probe")
        except Exception:  # not an OpenAI model name, no tiktoken, or its files are offline
            return
        self.kind = f"tiktoken ({encoding.name})"
        self._count = lambda text: len(encoding.encode(text, disallowed_special=()))
        self._cut = lambda text, limit: encoding.decode(
            encoding.encode(text, disallowed_special=())[:limit]
        )

    def count(self, text: str) -> int:
        return self._count(text)

    def over(self, texts: Sequence[str], limit: int) -> int:
        """How many of ``texts`` have more than ``limit`` tokens: what a local model cuts to
        its window without a word. Only texts that can be that long are tokenized (a token
        covers at least one byte of UTF-8; the margin is for the special tokens a
        tokenizer.json adds), so counting costs little beside a fast static model."""
        return sum(
            1
            for text in texts
            if len(text.encode()) + _SPECIAL_TOKENS_MARGIN > limit and self._count(text) > limit
        )

    def cut(self, text: str, limit: int) -> str:
        """The longest start of ``text`` of at most ``limit`` tokens."""
        cut = self._cut(text, limit)
        while cut and self._count(cut) > limit:  # the estimate may be short of the truth
            cut = cut[: int(len(cut) * 0.9)]
        return cut


def _estimate(text: str) -> int:
    return max(1, math.ceil(len(text) / _CHARS_PER_TOKEN))
