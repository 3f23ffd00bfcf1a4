"""What the local embedders read from a model folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

__all__ = ["declared_dimension", "weights_digest"]


def weights_digest(folder: Path) -> str:
    """A short digest of a model folder's weights: part of the embedder's ``model_id``, so
    new weights under the same folder name re-embed."""
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    h = hashlib.sha256()
    for f in weights:
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def declared_dimension(folder: Path) -> int | None:
    """The output dimension a sentence-transformers folder declares (its last Dense
    layer, else its pooling layer), or None when the layout says nothing we can read."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
        dimension: int | None = None
        for module in modules:
            config = folder / module.get("path", "") / "config.json"
            kind = module.get("type", "")
            if kind.endswith("Pooling") and config.exists():
                dimension = int(json.loads(config.read_text())["word_embedding_dimension"])
            elif kind.endswith("Dense") and config.exists():
                dimension = int(json.loads(config.read_text())["out_features"])
            elif not kind.endswith(("Transformer", "Normalize")):
                return None  # a module that may change the dimension in ways we do not know
        return dimension
    except (OSError, ValueError, KeyError, TypeError):
        return None
