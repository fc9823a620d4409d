"""Budgets: a site declines exactly the round that would pass its budget; what is written is spent."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedglm.config import PrivacyConfig
from fedglm.config.site import MetricsPrivacyConfig
from fedglm.errors import InputError
from fedglm.privacy.accounting import Release, epsilon
from fedglm.privacy.ledger import release_of
from fedglm.privacy.site import Decline, RoundPlan, history, plan_round, planned_metric_releases, sample_rate
from fedglm.training import private_steps_for
from tests.privacy.helpers import new_site, release, release_metrics

SIGMA, Q, STEPS = 1.0, 0.05, 20


def spent_after(rounds: int) -> float:
    return epsilon([Release(SIGMA, Q, STEPS)] * rounds, 1e-5, "prv")


def test_declines_exactly_when_the_next_round_would_exceed_the_budget(tmp_path: Path) -> None:
    budget = (spent_after(3) + spent_after(4)) / 2  # 3 rounds fit, the 4th does not
    privacy = PrivacyConfig(noise_multiplier=SIGMA, epsilon=budget, sample_rate=Q)
    site = new_site(tmp_path)
    for server_round in (1, 2, 3):
        line = release(site, privacy, server_round=server_round, q=Q, steps=STEPS)
        assert line is not None
        assert line.entry["epsilon"] == pytest.approx(spent_after(server_round), rel=1e-6)
        assert line.entry["epsilon"] <= budget
    decline = plan_round(
        privacy, site.lines(), q=Q, steps=STEPS, planned_rounds=4, n_train=1000, expected_batch=16.0
    )
    assert isinstance(decline, Decline)
    assert decline.epsilon == pytest.approx(spent_after(3), rel=1e-6)
    assert decline.would_be > budget
    assert "past the site's budget" in decline.reason(budget)
    # a smaller round still fits, and is not declined
    smaller = plan_round(
        privacy, site.lines(), q=Q, steps=1, planned_rounds=4, n_train=1000, expected_batch=16.0
    )
    assert isinstance(smaller, RoundPlan)


def test_a_crash_between_the_ledger_write_and_the_upload_counts_as_spent(tmp_path: Path) -> None:
    privacy = PrivacyConfig(noise_multiplier=SIGMA, epsilon=100.0, sample_rate=Q)
    site = new_site(tmp_path)
    written = release(site, privacy, server_round=1)
    assert written is not None
    # the process dies here: no residual saved, no reply sent; a fresh process reads the ledger
    after_restart = plan_round(
        privacy, site.lines(), q=Q, steps=STEPS, planned_rounds=4, n_train=1000, expected_batch=16.0
    )
    assert isinstance(after_restart, RoundPlan)
    assert after_restart.epsilon_before == pytest.approx(written.entry["epsilon"], rel=1e-9)
    assert history(site.lines()) == [Release(SIGMA, Q, STEPS)]


def test_calibration_spends_the_budget_over_the_planned_rounds(tmp_path: Path) -> None:
    privacy = PrivacyConfig(epsilon=3.0, sample_rate=Q, metrics=MetricsPrivacyConfig(enabled=False))
    site = new_site(tmp_path)
    lines = [release(site, privacy, server_round=r, planned_rounds=3) for r in (1, 2, 3)]
    assert all(line is not None for line in lines)
    final = lines[-1]
    assert final is not None and 2.95 < final.entry["epsilon"] <= 3.0
    assert release(site, privacy, server_round=4, planned_rounds=3) is None  # the budget is spent


def test_calibration_leaves_room_for_a_metric_release_each_round_and_the_bases(tmp_path: Path) -> None:
    privacy = PrivacyConfig(epsilon=8.0, sample_rate=Q)
    site = new_site(tmp_path)
    lines = [release_metrics(site, privacy, server_round=0)]
    for server_round in (1, 2, 3):
        lines += [
            release(site, privacy, server_round=server_round, planned_rounds=3),
            release_metrics(site, privacy, server_round=server_round),
        ]
    assert all(line is not None for line in lines)
    final = lines[-1]
    assert final is not None and 7.95 < final.entry["epsilon"] <= 8.0
    assert [release_of(line.entry) for line in site.lines()] == ["metrics", "update"] * 3 + ["metrics"]
    without = PrivacyConfig(epsilon=8.0, sample_rate=Q, metrics=MetricsPrivacyConfig(enabled=False))
    sigmas = [
        plan_round(p, [], q=Q, steps=20, planned_rounds=3, n_train=1000, expected_batch=16.0)
        for p in (privacy, without)
    ]
    assert isinstance(sigmas[0], RoundPlan) and isinstance(sigmas[1], RoundPlan)
    assert sigmas[0].sigma > sigmas[1].sigma  # the training noise pays for the metrics
    assert release(site, privacy, server_round=4, planned_rounds=3) is None  # the budget is spent
    assert release_metrics(site, privacy, server_round=4) is None


def test_delta_must_be_below_one_over_the_records(tmp_path: Path) -> None:
    privacy = PrivacyConfig(noise_multiplier=1.0, delta=1e-3, sample_rate=Q)
    with pytest.raises(
        InputError, match=r"privacy\.delta = 0\.001 is not below one over the number of training records"
    ):
        plan_round(privacy, [], q=Q, steps=STEPS, planned_rounds=1, n_train=2000, expected_batch=16.0)


def test_sampling_rate_and_steps_are_public() -> None:
    assert sample_rate(PrivacyConfig(sample_rate=0.02), batch_size=16, n_train=100) == 0.02
    assert sample_rate(PrivacyConfig(sample_rate=None), batch_size=16, n_train=100) == 0.16
    assert private_steps_for(None, 2.0, 0.1) == 20  # expected passes over the records, from q alone
    assert private_steps_for(7, None, 0.1) == 7


def test_metric_releases_are_reserved_only_when_asked_and_affordable() -> None:
    privacy = PrivacyConfig(epsilon=8.0, sample_rate=Q)
    assert planned_metric_releases(privacy, 3) == (Release(5.0, 1.0, 4),)
    assert planned_metric_releases(privacy, 3, asked=False) == ()
    # a small budget or a long run: the releases alone would take over half the budget, so the
    # site keeps it all for training (before, calibration failed and the site never trained)
    assert planned_metric_releases(PrivacyConfig(epsilon=1.0, sample_rate=Q), 3) == ()
    assert planned_metric_releases(privacy, 100) == ()
    plan = plan_round(
        PrivacyConfig(epsilon=1.0, sample_rate=Q),
        [],
        q=Q,
        steps=20,
        planned_rounds=3,
        n_train=1000,
        expected_batch=16.0,
    )
    assert isinstance(plan, RoundPlan)
