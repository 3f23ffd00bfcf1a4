"""Embedders: text → vector."""

from .base import Embedder

__all__ = ["Embedder"]
