"""The coordinator pools the sites' DP metric releases: windows, estimates, and a hostile site."""

from __future__ import annotations

from typing import Any

import pytest

from fedglm.config import SiteMetricsConfig
from fedglm.privacy.ledger import LedgerLine
from fedglm.privacy.metric_release import Released, Window
from fedglm.server.site_metrics import NOISE_MARGIN, SiteMetrics, SiteMetricsPool

CONFIG = SiteMetricsConfig()
FIRST = Window(CONFIG.first_centre, CONFIG.first_radius)


def line(released: Released, client: str = "site-a", sigma: float = 5.0) -> LedgerLine:
    entry: dict[str, Any] = {"client": client, "sigma": sigma, "metrics": released.as_json()}
    return LedgerLine(1, entry, "", "")


def honest(window: Window, loss: float, bpb: float, n: int = 400) -> Released:
    c = window.centre
    return Released(window, (n * (loss - c[0]), n * (bpb - c[1])), float(n))


def test_round_0_asks_for_the_wide_window_then_centres_on_the_estimate() -> None:
    pool = SiteMetricsPool(CONFIG)
    assert pool.window == FIRST
    pooled = pool.pool([line(honest(FIRST, 6.0, 3.0)), line(honest(FIRST, 7.0, 3.5), "site-b")], 0)
    assert pooled is not None and pooled.sites == 2
    assert (pooled.loss, pooled.bpb) == pytest.approx((6.5, 3.25))
    assert pool.window is not None and pool.window.centre == pytest.approx((6.5, 3.25))
    # the next radius: the configured one, or 3 noise stds of the centre when that is wider
    expected = [
        max(r, NOISE_MARGIN * n)
        for r, n in zip(CONFIG.radius, (pooled.loss_noise, pooled.bpb_noise), strict=True)
    ]
    assert pool.window.radius == pytest.approx(tuple(expected))


def test_a_noisy_estimate_widens_the_next_window_up_to_the_first() -> None:
    noisy = SiteMetrics(loss=11.6, bpb=5.0, loss_noise=4.6, bpb_noise=2.0, sites=3)
    window = SiteMetricsPool(CONFIG, previous=noisy).window
    assert window == FIRST  # 3 x 4.6 capped at the first radius: the first window again


def test_every_window_lies_inside_the_first() -> None:
    """Noise cannot walk the windows (and so the estimates) away round after round."""
    edge = SiteMetrics(loss=16.0, bpb=-1.0, loss_noise=0.1, bpb_noise=0.1, sites=2)
    window = SiteMetricsPool(CONFIG, previous=edge).window
    assert window == Window((14.0, 1.0), CONFIG.radius)  # [12, 16] and [0, 2]


def test_a_hostile_site_moves_the_mean_by_at_most_its_window() -> None:
    pool = SiteMetricsPool(CONFIG, previous=SiteMetrics(6.0, 3.0, 0.01, 0.01, 4))
    window = pool.window
    assert window is not None
    lines = [line(honest(window, 6.0, 3.0), f"site-{i}") for i in range(3)]
    lines.append(line(Released(window, (1e9, -1e9), 1.0), "hostile"))
    pooled = pool.pool(lines, 3)
    assert pooled is not None
    assert pooled.loss == pytest.approx(6.0 + window.radius[0] / 4)
    assert pooled.bpb == pytest.approx(3.0 - window.radius[1] / 4)


def test_a_release_for_another_window_is_left_out() -> None:
    pool = SiteMetricsPool(CONFIG)
    other = Window((1.0, 1.0), (0.5, 0.5))
    assert pool.pool([line(honest(other, 1.0, 1.0))], 0) is None
    assert pool.window == FIRST  # nothing learnt: the same window again


def test_no_config_asks_for_nothing() -> None:
    pool = SiteMetricsPool(None)
    assert pool.window is None and pool.pool([line(honest(FIRST, 6.0, 3.0))], 0) is None


def test_the_last_rows_estimate_is_where_a_resumed_run_centres() -> None:
    pooled = SiteMetrics(5.5, 2.5, 0.03, 0.02, 4)
    assert SiteMetrics.from_row({"round": 2, **pooled.row()}) == pooled
    assert SiteMetrics.from_row({"round": 2, "dp_val_loss": None}) is None
