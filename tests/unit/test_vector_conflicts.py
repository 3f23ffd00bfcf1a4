"""How a vector someone else wrote is told from the one vectorsync wrote (conflicts)."""

from __future__ import annotations

import array

from vectorsync.conflicts import parts_of, same_vector, vector_digest
from vectorsync.sinks.base import VectorSpec


def _as_stored(vector: list[float]) -> list[float]:
    """What a Qdrant sink hands back for a cosine vector: normalized, float32."""
    norm = sum(x * x for x in vector) ** 0.5
    return list(array.array("f", [x / norm for x in vector]))


def test_a_cosine_vector_equals_itself_as_the_sink_stores_it_and_no_other() -> None:
    parts = parts_of((), 4, "cosine")
    ours = [3.0, 1.0, 0.5, 2.0]  # an embedder's output need not be normalized
    assert same_vector(ours, _as_stored(ours), parts)
    assert not same_vector(ours, _as_stored([3.0, 1.0, 0.5, 2.1]), parts)
    assert not same_vector(ours, _as_stored([-3.0, -1.0, -0.5, -2.0]), parts)
    assert not same_vector(ours, [0.0] * 4, parts)
    assert vector_digest(_as_stored(ours), parts) == vector_digest(ours, parts)


def test_each_named_vector_is_compared_apart_and_dot_vectors_as_they_are() -> None:
    layout = (
        VectorSpec(name="title", dimension=2, distance="cosine"),
        VectorSpec(name="words", dimension=0, distance="dot", sparse=True),  # not compared
        VectorSpec(name="body", dimension=3, distance="dot"),
    )
    parts = parts_of(layout, 5, "cosine")
    assert parts == ((0, 2, "cosine"), (2, 5, "dot"))
    ours = [2.0, 0.0, 1.0, 2.0, 3.0]
    assert same_vector(ours, [1.0, 0.0, 1.0, 2.0, 3.0], parts)  # the title normalized
    assert not same_vector(ours, [1.0, 0.0, 2.0, 4.0, 6.0], parts)  # dot: the length counts
    assert not same_vector(ours, ours[:4], parts)
