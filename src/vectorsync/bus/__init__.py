"""The change bus of scale-out mode: ``vectorsync capture`` publishes change keys to it,
``vectorsync worker`` processes consume them partition by partition (see scaleout.py)."""

from .base import Bus, partition_of

__all__ = ["Bus", "partition_of"]
