"""Chunking: a record's rendered text cut into chunks, each written as its own point.

A chunk is identified by its text (and which occurrence of that text it is), not by its
position: a paragraph inserted above leaves the ids of the chunks below unchanged, so
they keep their vectors and only their position fields are updated. The cutting itself
is semantic-text-splitter's (Rust): paragraphs first, then sentences, then words, sized
in the embedder's own tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from .config import ChunkingConfig, EmbedderConfig
from .errors import ConfigError, RecordError
from .model import NAMESPACE, Key, uuid5_text

__all__ = [
    "CHUNK_FIELDS",
    "Chunk",
    "Chunker",
    "chunk_point_id",
    "chunker_for",
    "chunking_definition",
    "tokenizer_file",
]

# payload fields every chunk point carries beside the record's own
CHUNK_FIELDS = ("chunk_index", "chunk_count", "chunk_start", "chunk_end", "chunk_text")
_CHARS_PER_TOKEN = 4  # the estimate for an embedder without a tokenizer (as in embed/openai.py)
# chunk ids live in a namespace of their own: no record id can equal a chunk id
_CHUNK_NS = hashlib.sha1(NAMESPACE.bytes + b"chunks").digest()[:16]


@dataclass(frozen=True, slots=True)
class Chunk:
    index: int
    start: int  # character offsets in the rendered text: text[start:end] is the chunk
    end: int
    text: str
    occurrence: int  # how many earlier chunks of the record have the same text

    @property
    def identity(self) -> str:
        return xxhash.xxh3_128_hexdigest(self.text.encode())


def chunk_point_id(mapping: str, key: Key, chunk: Chunk) -> str:
    """Deterministic id of a chunk point: (mapping, record key, chunk text, occurrence)."""
    raw = f"{mapping}\x1f{key}\x1f{chunk.identity}\x1f{chunk.occurrence}".encode()
    return uuid5_text(_CHUNK_NS, raw)


def tokenizer_file(embedder: EmbedderConfig | None) -> Path | None:
    """The ``tokenizer.json`` of an embedder's model, when it has one we can read."""
    if embedder is None:
        return None
    folder: str | Path | None = None
    kind = embedder.kind
    if kind == "sentence-transformers":
        from .embed.sentence_transformers import bundled_model_path

        folder = getattr(embedder, "model", None) or bundled_model_path()
    elif kind in ("openai", "sparse"):
        folder = getattr(embedder, "tokenizer", None)
    else:
        folder = getattr(embedder, "path", None)  # model folders of other local kinds
    if folder is None:
        return None
    path = Path(folder)
    path = path / "tokenizer.json" if path.is_dir() else path
    return path if path.is_file() else None


class Chunker:
    """Cuts texts as one mapping's ``[mappings.chunking]`` says."""

    def __init__(self, config: ChunkingConfig, tokenizer: Path | None) -> None:
        try:
            from semantic_text_splitter import MarkdownSplitter, TextSplitter
        except ImportError as exc:
            raise ConfigError(
                "[mappings.chunking] needs semantic-text-splitter: "
                "pip install 'vectorsync[chunking]'"
            ) from exc

        self.config = config
        self.tokenizer = tokenizer
        kind = MarkdownSplitter if config.splitter == "markdown" else TextSplitter
        size, overlap = config.size, config.overlap
        self.measure = "chars"
        if config.unit == "tokens" and tokenizer is not None:
            from .embed.tokens import load_tokenizer

            tok = load_tokenizer(
                tokenizer, "chunking", 'fix the embedder\'s model folder or set unit = "chars"'
            )
            self._splitter: Any = kind.from_huggingface_tokenizer(tok, size, overlap=overlap)
            self.measure = f"tokens ({tokenizer})"
        elif config.unit == "tokens":  # no tokenizer: about 4 characters a token
            size, overlap = size * _CHARS_PER_TOKEN, overlap * _CHARS_PER_TOKEN
            self._splitter = kind(size, overlap=overlap)
            self.measure = f"tokens estimated as {_CHARS_PER_TOKEN} characters"
        else:
            self._splitter = kind(size, overlap=overlap)

    def __reduce__(self) -> tuple[type[Chunker], tuple[ChunkingConfig, Path | None]]:
        """Pickled as its settings (the splitter is rebuilt where it loads)."""
        return Chunker, (self.config, self.tokenizer)

    def definition(self) -> dict[str, Any]:
        """What the chunks are cut by: part of the index version's digest."""
        return {**self.config.model_dump(mode="json"), "measure": self.measure}

    def split(self, text: str) -> list[Chunk]:
        """The chunks of ``text`` (an empty text is one empty chunk: the record keeps a
        point, as it does without chunking)."""
        try:
            pieces: list[tuple[int, str]] = self._splitter.chunk_indices(text)
        except Exception as exc:  # the splitter is native code: name the record, go on
            raise RecordError(f"chunking failed: {exc}", kind="chunking") from exc
        if not pieces:
            pieces = [(0, text)]
        seen: dict[str, int] = {}
        chunks = []
        for i, (start, piece) in enumerate(pieces):
            n = seen.get(piece, 0)
            seen[piece] = n + 1
            chunks.append(
                Chunk(index=i, start=start, end=start + len(piece), text=piece, occurrence=n)
            )
        return chunks


def chunking_definition(
    config: ChunkingConfig | None, embedder: EmbedderConfig | None
) -> dict[str, Any] | None:
    """How an index version's chunks are cut (kept in its definition): the settings, and
    the tokenizer file that sizes them (``tokenizer`` is where it was found, left out of
    the version's digest: a reinstall moves it without changing it)."""
    if config is None:
        return None
    found = tokenizer_file(embedder) if config.unit == "tokens" else None
    return {
        **config.model_dump(mode="json"),
        "measure": "chars" if config.unit == "chars" else "tokens" if found else "estimate",
        "tokenizer": None if found is None else str(found),
    }


def chunker_for(definition: Mapping[str, Any] | None) -> Chunker | None:
    """The chunker an index version's chunking definition describes (None: not chunked)."""
    if not definition:
        return None
    config = ChunkingConfig.model_validate(
        {k: v for k, v in definition.items() if k not in ("measure", "tokenizer")}
    )
    tokenizer = definition.get("tokenizer")
    return Chunker(config, Path(tokenizer) if tokenizer else None)
