"""The fine buckets of a full check: a fine bucket's low bits are its key's digest bucket,
and folding the fine buckets gives the digest buckets the Merkle roots are built over."""

from __future__ import annotations

import random
from array import array

from vectorsync.check import BUCKETS, _differing, _fold
from vectorsync.check_fold import FINE as _FINE
from vectorsync.check_fold import fine_bucket as _fine
from vectorsync.model import key_bucket


def test_fine_bucket_refines_the_digest_bucket() -> None:
    for key in [0, 1, 42, -7, 10**18, "a", "ünï", "x" * 2000]:
        assert 0 <= _fine(key) < _FINE
        assert _fine(key) % BUCKETS == key_bucket(key)


def test_fold_is_the_xor_of_the_fine_buckets_of_each_digest_bucket() -> None:
    rng = random.Random(3)
    fine = array("Q", bytes(8 * _FINE))
    direct = [0] * BUCKETS
    for key in range(5000):
        digest = rng.getrandbits(64)
        fine[_fine(key)] ^= digest
        direct[key_bucket(key)] ^= digest
    assert _fold(fine) == direct


def test_differing_names_exactly_the_fine_buckets_that_differ() -> None:
    a = array("Q", bytes(8 * _FINE))
    b = array("Q", bytes(8 * _FINE))
    assert _differing(a, b) == set()
    a[5] ^= 1
    b[_FINE - 1] ^= 2**63
    assert _differing(a, b) == {5, _FINE - 1}
