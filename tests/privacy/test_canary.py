"""The one-run audit bound: known answers, an independent brute-force computation, properties."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedglm.privacy.canary import (
    GUESS_GRID,
    audit_scores,
    epsilon_lower_bound,
    guesses,
    p_value,
)


def brute_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The same tail bound from exact binomial sums, term by term (no shared code)."""
    p = Fraction(math.exp(epsilon)) / (1 + Fraction(math.exp(epsilon)))

    def at_least(u: int) -> Fraction:
        return sum(
            (math.comb(r, j) * p**j * (1 - p) ** (r - j) for j in range(max(u, 0), r + 1)), Fraction(0)
        )

    tail = at_least(v)
    spread = max((Fraction(at_least(v - i) - tail) / i for i in range(1, v + 1)), default=Fraction(0))
    return min(1.0, float(tail + 2 * m * Fraction(delta) * spread))


def brute_bound(m: int, r: int, v: int, delta: float, beta: float) -> float:
    """Smallest epsilon on a 1e-4 grid whose brute-force p-value reaches beta."""
    if brute_p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    low, high = 0.0, 20.0
    while high - low > 1e-4:
        middle = (low + high) / 2
        if brute_p_value(m, r, v, middle, delta) < beta:
            low = middle
        else:
            high = middle
    return low


def test_all_right_matches_the_closed_form() -> None:
    # delta = 0, v = r: P[Binomial(r, p) >= r] = p^r = beta, so p = beta^(1/r).
    p = 0.05 ** (1 / 10)
    assert epsilon_lower_bound(m=100, r=10, v=10) == pytest.approx(math.log(p / (1 - p)), abs=1e-5)


@pytest.mark.parametrize(
    ("m", "r", "v", "delta"),
    [(20, 12, 11, 0.0), (20, 12, 11, 1e-3), (50, 20, 17, 1e-4), (30, 8, 8, 1e-2), (40, 15, 9, 0.0)],
)
def test_matches_a_brute_force_binomial_sum(m: int, r: int, v: int, delta: float) -> None:
    for epsilon in (0.0, 0.5, 1.7):
        assert p_value(m=m, r=r, v=v, epsilon=epsilon, delta=delta) == pytest.approx(
            brute_p_value(m, r, v, epsilon, delta), rel=1e-9, abs=1e-12
        )
    assert epsilon_lower_bound(m=m, r=r, v=v, delta=delta) == pytest.approx(
        brute_bound(m, r, v, delta, 0.05), abs=2e-4
    )


def test_delta_only_lowers_the_bound() -> None:
    plain = epsilon_lower_bound(m=1000, r=100, v=90)
    with_delta = epsilon_lower_bound(m=1000, r=100, v=90, delta=1e-5)
    large_delta = epsilon_lower_bound(m=1000, r=100, v=90, delta=1e-3)
    assert plain > with_delta > large_delta > 0
    # delta at which 2 m delta alone exceeds beta: nothing is rejected
    assert epsilon_lower_bound(m=1000, r=100, v=90, delta=0.5) == 0.0


def test_no_information_gives_zero() -> None:
    assert epsilon_lower_bound(m=100, r=0, v=0) == 0.0
    assert epsilon_lower_bound(m=100, r=50, v=25, delta=1e-5) == 0.0
    assert epsilon_lower_bound(m=100, r=50, v=0) == 0.0


def test_bound_grows_with_right_guesses() -> None:
    bounds = [epsilon_lower_bound(m=1000, r=1000, v=v, delta=1e-5) for v in (600, 700, 800, 900, 1000)]
    assert bounds == sorted(bounds)
    assert bounds[0] > 0.0
    assert bounds[-1] > 5.0


@settings(max_examples=60, deadline=None)
@given(
    r=st.integers(min_value=1, max_value=300),
    fraction=st.floats(min_value=0.0, max_value=1.0),
    delta=st.sampled_from([0.0, 1e-6, 1e-5, 1e-3]),
)
def test_monotone_in_v(r: int, fraction: float, delta: float) -> None:
    v = min(r - 1, int(fraction * r))
    low = epsilon_lower_bound(m=2 * r, r=r, v=v, delta=delta)
    high = epsilon_lower_bound(m=2 * r, r=r, v=v + 1, delta=delta)
    assert high >= low


@settings(max_examples=40, deadline=None)
@given(
    r=st.integers(min_value=1, max_value=200),
    fraction=st.floats(min_value=0.0, max_value=1.0),
    delta=st.sampled_from([0.0, 1e-5, 1e-3]),
)
def test_p_value_rises_with_epsilon_and_the_bound_sits_on_beta(r: int, fraction: float, delta: float) -> None:
    v = int(fraction * r)
    values = [p_value(m=2 * r, r=r, v=v, epsilon=e, delta=delta) for e in np.linspace(0.0, 12.0, 49)]
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(values))
    bound = epsilon_lower_bound(m=2 * r, r=r, v=v, delta=delta)
    if 0.0 < bound < 12.0:
        assert p_value(m=2 * r, r=r, v=v, epsilon=bound, delta=delta) < 0.05
        assert p_value(m=2 * r, r=r, v=v, epsilon=bound + 1e-5, delta=delta) >= 0.05


def test_random_scores_rarely_give_a_positive_bound() -> None:
    # Scores independent of the inclusion bits: a valid 95% bound is > 0 in at most ~5% of runs.
    rng = np.random.default_rng(7)
    positive = 0
    for _ in range(60):
        included = rng.random(500) < 0.5
        result = audit_scores(rng.standard_normal(500), included, delta=1e-5)
        positive += result.epsilon > 0.0
        assert result.epsilon < 0.5
    assert positive <= 6


def test_perfect_scores_give_a_large_bound_with_bonferroni() -> None:
    rng = np.random.default_rng(3)
    included = rng.random(1000) < 0.5
    result = audit_scores(included.astype(float), included, delta=1e-5)
    assert result.tests == len(GUESS_GRID)
    assert result.v == result.r
    # one test at beta / len(grid) with the same r and v
    alone = epsilon_lower_bound(m=1000, r=result.r, v=result.v, delta=1e-5, beta=0.05 / len(GUESS_GRID))
    assert result.epsilon == pytest.approx(alone)
    assert result.epsilon > epsilon_lower_bound(m=1000, r=100, v=70, delta=1e-5)
    assert result.epsilon < epsilon_lower_bound(m=1000, r=result.r, v=result.v, delta=1e-5)


def test_guesses_take_the_extremes() -> None:
    scores = np.array([0.3, -1.0, 2.0, 0.0, 5.0])
    assert guesses(scores, k_plus=2, k_minus=1).tolist() == [0, -1, 1, 0, 1]
    assert guesses(np.zeros(3), k_plus=1, k_minus=1).tolist() == [1, 0, -1]  # ties by index


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"m": 0, "r": 0, "v": 0}, "`m`"),
        ({"m": 10, "r": 11, "v": 0}, "`r`"),
        ({"m": 10, "r": 5, "v": 6}, "`v`"),
        ({"m": 10, "r": 5, "v": 5, "delta": -1.0}, "`delta`"),
        ({"m": 10, "r": 5, "v": 5, "beta": 1.0}, "`beta`"),
    ],
)
def test_bad_arguments_name_the_value(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        epsilon_lower_bound(**kwargs)  # type: ignore[arg-type]


def test_scores_must_be_finite_and_match_the_bits() -> None:
    with pytest.raises(ValueError, match="NaN"):
        audit_scores([0.0, float("nan")], [True, False], delta=0.0)
    with pytest.raises(ValueError, match="equal"):
        audit_scores([0.0, 1.0], [True], delta=0.0)
