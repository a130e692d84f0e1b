"""Packed words (the nonzero words of a route block or histogram, what the
daemon keeps per process and route): the Cython helpers and their pure-Python
twins give the same bytes and the same results, and a packed block or
histogram reads back as the words it was packed from."""

from __future__ import annotations

import random
from array import array

import pytest

from netprof_core import Histogram, _recorder_py
from netprof_core import _layout as L
from netprof_core.reader import PackedBlock


def _words(rng: random.Random, n: int) -> array[int]:
    return array("Q", [rng.randrange(1, 2**64) if rng.random() < 0.15 else 0 for _ in range(n)])


def test_pack_add_subtract_round_trip(core: object) -> None:
    rng = random.Random(7)
    for _ in range(50):
        words = _words(rng, rng.randrange(0, 2500))
        start = rng.randrange(0, len(words) + 1)
        count = rng.randrange(0, len(words) - start + 1)
        packed = core.pack_words(bytearray(words.tobytes()), start, count)  # type: ignore[attr-defined]
        assert packed == _recorder_py.pack_words(words, start, count)
        into = array("Q", bytes(8 * count))
        core.add_packed(into, packed)  # type: ignore[attr-defined]
        assert into.tobytes() == words.tobytes()[start * 8 : (start + count) * 8]
        assert core.subtract_packed(into, packed)  # type: ignore[attr-defined]
        assert not any(into)
        if packed != _recorder_py.pack_words(into, 0, count):  # something to subtract from zeros
            assert not core.subtract_packed(into, packed)  # type: ignore[attr-defined]
            assert not any(into)  # refused: left unchanged


def test_bad_packed_words_are_refused(core: object) -> None:
    into = array("Q", [0] * 4)
    for bad in (b"", b"\1\0\0\0\0\0\0\0", b"\1\0\0\0\0\0\0\0" + bytes(8) + b"\x09\x00"):
        with pytest.raises(ValueError):
            core.add_packed(into, bad)  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        core.pack_words(into, 2, 3)  # type: ignore[attr-defined]
    assert not any(into)


def test_packed_block_and_histogram_read_back() -> None:
    rng = random.Random(3)
    block = _words(rng, L.ROUTE_BLOCK_WORDS)
    packed = PackedBlock.read(memoryview(block), 0)
    assert packed.count == block[L.R_COUNT] and packed.max_ns == block[L.R_MAX_NS]
    assert packed.words() == block
    counts = array("Q", [rng.randrange(0, 1000) if rng.random() < 0.1 else 0 for _ in range(L.HIST_BUCKETS)])
    dense = Histogram(counts, 5)
    lazy = Histogram.from_packed(_recorder_py.pack_words(counts, 0, L.HIST_BUCKETS), 5)
    total = Histogram()
    lazy.add_to(total.counts)
    assert total.counts == dense.counts and lazy == dense and lazy.count == dense.count
