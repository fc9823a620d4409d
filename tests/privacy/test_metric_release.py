"""The Gaussian mechanism on a site's validation metrics: its sensitivity, its noise, its estimate."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from fedglm.privacy.metric_release import (
    Released,
    Window,
    check_released,
    estimate,
    record_metrics,
    release,
)
from fedglm.training import RecordLoss

WINDOW = Window((4.0, 2.0), (2.0, 1.0))


def normalised(released: Released) -> np.ndarray:
    """The released vector in the units of the module docstring (sensitivity 1)."""
    r = released.window.radius
    return np.array([released.sums[0] / r[0], released.sums[1] / r[1], released.count]) / math.sqrt(3)


@pytest.mark.parametrize("extra", [(4.0, 2.0), (100.0, -50.0), (-1e6, 1e6), (5.9, 2.9)])
def test_one_record_moves_the_release_by_at_most_the_sensitivity(extra: tuple[float, float]) -> None:
    """The same noise (same seed) on neighbouring data sets: the difference is one record's part."""
    values = [(4.0 + 0.1 * i, 2.0 - 0.05 * i) for i in range(-30, 30)]
    without = release(values, WINDOW, 1.0, np.random.default_rng(7))
    with_one = release([*values, extra], WINDOW, 1.0, np.random.default_rng(7))
    assert np.linalg.norm(normalised(with_one) - normalised(without)) <= 1.0 + 1e-9


def test_the_noise_has_the_stated_standard_deviation() -> None:
    rng = np.random.default_rng(0)
    values = [(4.5, 1.5)] * 50
    draws = np.array([[*r.sums, r.count] for r in (release(values, WINDOW, 2.0, rng) for _ in range(4000))])
    expected = 2.0 * math.sqrt(3) * np.array([2.0, 1.0, 1.0])
    np.testing.assert_allclose(draws.std(axis=0), expected, rtol=0.05)
    assert np.all(np.abs(draws.mean(axis=0) - [25.0, -25.0, 50.0]) < 4 * expected / math.sqrt(4000))


def test_the_estimate_recovers_the_mean_and_stays_within_the_window() -> None:
    rng = np.random.default_rng(1)
    values = [(4.0 + 0.5 * math.sin(i), 2.0 + 0.2 * math.cos(i)) for i in range(2000)]
    truth = np.mean(values, axis=0)
    found = estimate(release(values, WINDOW, 1.0, rng), 1.0)
    assert abs(found.loss - truth[0]) < 4 * found.loss_std and abs(found.bpb - truth[1]) < 4 * found.bpb_std
    assert found.loss_std == pytest.approx(math.sqrt(3) * math.hypot(2.0, found.loss - 4.0) / 2000, rel=0.01)
    # A release whose noisy count is near zero: the estimate still lies within the window.
    wild = estimate(Released(WINDOW, (1e6, -1e6), 0.01), 5.0)
    assert (wild.loss, wild.bpb) == (6.0, 1.0) and wild.loss_std <= 2.0


def test_records_that_predict_nothing_are_left_out() -> None:
    losses = [RecordLoss(nll=6.0, tokens=3), RecordLoss(nll=0.0, tokens=0)]
    assert record_metrics(losses, [4, 10]) == [(2.0, 6.0 / math.log(2) / 4)]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ({"centre": [1, 1], "radius": [1, 1], "sums": [0, 0]}, "exactly"),
        ({"centre": [1, 1], "radius": [1, 1], "sums": [0, 0], "count": True}, "finite numbers"),
        ({"centre": [1, 1], "radius": [1, 1], "sums": [0, 0], "count": float("inf")}, "finite numbers"),
        ({"centre": [1], "radius": [1, 1], "sums": [0, 0], "count": 3}, "lists of two"),
        ({"centre": [1, 1], "radius": [-1, 1], "sums": [0, 0], "count": 3}, "radii in"),
        ({"centre": [1e9, 1], "radius": [1, 1], "sums": [0, 0], "count": 3}, "centres must lie"),
        ([1, 2], "exactly"),
    ],
)
def test_a_malformed_release_is_named(value: Any, reason: str) -> None:
    problem = check_released(value)
    assert problem is not None and reason in problem
    with pytest.raises(ValueError, match=reason):
        Released.from_json(value)


def test_a_release_reads_back_as_written() -> None:
    released = release([(4.0, 2.0)] * 10, WINDOW, 5.0)
    assert check_released(released.as_json()) is None
    assert Released.from_json(released.as_json()) == released


def test_a_crafted_model_that_overflows_on_a_trigger_leaks_nothing() -> None:
    """Attack: the coordinator's model makes one record's loss NaN or infinite. Before, NaN
    reached the released sums and the site failed to write its line (learning whether a
    trigger record is in its validation set cost nothing). Now such a record counts at the
    window's edge, the release is finite, and one record still moves it by at most 1."""
    values = [(4.0, 2.0)] * 20
    for crafted in [(math.nan, math.nan), (math.inf, -math.inf), (-math.inf, math.nan)]:
        without = release(values, WINDOW, 1.0, np.random.default_rng(3))
        with_one = release([*values, crafted], WINDOW, 1.0, np.random.default_rng(3))
        assert check_released(with_one.as_json()) is None
        assert np.linalg.norm(normalised(with_one) - normalised(without)) <= 1.0 + 1e-9
