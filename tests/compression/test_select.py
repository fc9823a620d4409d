"""Top-k selection: increasing positions, never more than k, exact when it returns k, no zeros."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedglm.compression.select import CHUNK, at_least, keep_count, largest, sampled_threshold, top_k
from tests.compression.helpers import hypothesis_settings

SETTINGS = hypothesis_settings(150)


def exact_top_k(values: np.ndarray, k: int) -> set[int]:
    """The k largest magnitudes, by a full partition (magnitudes assumed distinct)."""
    if k <= 0:
        return set()
    if k >= values.size:
        return set(range(values.size))
    return set(np.argpartition(np.abs(values), values.size - k)[values.size - k :].tolist())


@st.composite
def distinct_magnitudes(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    """(values with pairwise distinct magnitudes, k)."""
    low, high = draw(st.sampled_from([(1, 100), (101, 5000), (5001, 300_000)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = int(rng.integers(low, high + 1))
    scale = draw(st.sampled_from([1e-30, 1e-6, 1.0, 1e20]))
    ranks = rng.permutation(n) + 1  # distinct integers: exact in float32 below 2^24
    values = (ranks * rng.choice([-1.0, 1.0], n)).astype(np.float32) * np.float32(scale)
    assert np.unique(np.abs(values)).size == n
    fraction = draw(st.sampled_from([0.0, 0.001, 0.01, 0.05, 0.3, 0.9, 1.0, None]))
    k = int(rng.integers(0, n + 1)) if fraction is None else max(1, round(n * fraction))
    return values, min(k, n)


@SETTINGS
@given(data=distinct_magnitudes())
def test_top_k_is_exact_when_it_returns_k(data: tuple[np.ndarray, int]) -> None:
    values, k = data
    positions = top_k(values, k)
    assert positions.dtype == np.int64
    assert (np.diff(positions) > 0).all()
    assert positions.size <= k
    if positions.size:
        assert positions[0] >= 0 and positions[-1] < values.size
    # what it returns is always the largest positions.size magnitudes; all k when it returns k
    assert set(positions.tolist()) == exact_top_k(values, positions.size)
    if k and values.size <= 80:  # small inputs are sorted exactly
        assert positions.size == k


@SETTINGS
@given(
    sizes=st.sampled_from([(1, 100), (101, 50_000)]),
    zeros=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_top_k_never_returns_zeros(sizes: tuple[int, int], zeros: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(sizes[0], sizes[1] + 1))
    k = int(rng.integers(0, n + 10))
    values = rng.standard_normal(n).astype(np.float32)
    values[rng.random(n) < zeros] = 0.0
    values[rng.random(n) < 0.01] = -0.0
    positions = top_k(values, k)
    assert positions.size <= min(k, int(np.count_nonzero(values)))
    assert (values[positions] != 0).all()
    assert (np.diff(positions) > 0).all()


def test_top_k_of_all_zeros_is_empty() -> None:
    assert top_k(np.zeros(1000, dtype=np.float32), 10).size == 0
    assert top_k(np.zeros(1, dtype=np.float32), 1).size == 0
    assert top_k(np.ones(10, dtype=np.float32), 0).size == 0
    assert top_k(np.ones(10, dtype=np.float32), -3).size == 0


def test_top_k_with_ties_keeps_at_most_k() -> None:
    values = np.ones(1000, dtype=np.float32)
    values[::2] = -1
    for k in (1, 10, 500, 999, 1000):
        positions = top_k(values, k)
        assert 0 < positions.size <= k
        assert (np.diff(positions) > 0).all()


def test_top_k_across_chunks() -> None:
    n = 2 * CHUNK + 12345
    rng = np.random.default_rng(7)
    values = (rng.permutation(n) + 1).astype(np.float32) * rng.choice([-1, 1], n).astype(np.float32)
    for k in (1, 1000, 20000):
        positions = top_k(values, k)
        assert set(positions.tolist()) == exact_top_k(values, positions.size)
        assert positions.size >= 0.9 * k
        assert np.array_equal(positions, top_k(values.copy(), k)), "not deterministic"
    assert np.array_equal(at_least(values, float(n - 2)), np.flatnonzero(np.abs(values) >= n - 2))


@settings(SETTINGS, max_examples=60)
@given(
    sizes=st.sampled_from([(1, 100), (101, 10_000), (CHUNK - 10, 2 * CHUNK + 100)]),
    seed=st.integers(0, 2**32 - 1),
    quantile=st.floats(0.0, 1.0),
    k=st.integers(-5, 100),
)
def test_threshold_keeps_exactly_the_entries_at_or_above_it(
    sizes: tuple[int, int], seed: int, quantile: float, k: int
) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(sizes[0], sizes[1] + 1))
    values = (rng.standard_normal(n) * rng.choice([1e-3, 1.0], n)).astype(np.float32)
    values[rng.random(n) < 0.3] = 0.0
    threshold = float(np.quantile(np.abs(values), quantile).astype(np.float32))
    if threshold == 0.0:
        threshold = float(np.finfo(np.float32).smallest_subnormal)
    positions = top_k(values, k, threshold=threshold)
    assert positions.dtype == np.int64
    assert np.array_equal(positions, np.flatnonzero(np.abs(values) >= np.float32(threshold)))


def test_sampled_threshold_is_never_zero_and_exact_for_small_inputs() -> None:
    assert sampled_threshold(np.zeros(100, dtype=np.float32), 5) > 0
    values = np.arange(1, 51, dtype=np.float32)
    # target = ceil(1.2 * 10) = 12 -> the 12th largest magnitude, 39
    assert sampled_threshold(values, 10) == 39.0
    assert sampled_threshold(values, 10, oversample=1.0) == 41.0


def test_largest_cuts_candidates_to_k() -> None:
    values = np.array([5, -1, 3, -4, 2], dtype=np.float32)
    assert largest(values, np.arange(5), 2).tolist() == [0, 3]
    assert largest(values, np.array([1, 2]), 5).tolist() == [1, 2]


@pytest.mark.parametrize(
    ("n", "density", "expected"),
    [
        (0, 0.5, 0),
        (0, 1.0, 0),
        (1, 1e-9, 1),  # a non-empty tensor keeps at least one value
        (1000, 1e-9, 1),
        (1000, 0.05, 50),
        (1000, 1.0, 1000),
        (1000, 2.0, 1000),  # never more than n
        (10, 0.25, 2),  # round half to even: 2.5 -> 2
        (10, 0.35, 4),  # 3.5 -> 4
        (7, 2 / 7, 2),
        (784, 0.05, 39),
    ],
)
def test_keep_count(n: int, density: float, expected: int) -> None:
    assert keep_count(n, density) == expected


@given(n=st.integers(0, 10**9), density=st.floats(0.0, 1.0, exclude_min=True))
@settings(SETTINGS, max_examples=300)
def test_keep_count_bounds(n: int, density: float) -> None:
    k = keep_count(n, density)
    assert (k == 0) if n == 0 else (1 <= k <= n)
    assert abs(k - n * density) <= 1 or k == 1


def test_full_density_keeps_every_nonzero_value() -> None:
    values = np.random.default_rng(3).standard_normal(100_000).astype(np.float32)
    values[::7] = 0.0
    assert np.array_equal(top_k(values, values.size), np.flatnonzero(values))
