"""Known answers (../shared/notes/privacy.md, q = 0.01, delta = 1e-5) and independent agreement."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedglm.privacy.accounting import Release, calibrate_sigma, epsilon, merged
from fedglm.privacy.audit import dp_accounting_epsilon

# sigma, steps, Opacus RDP, dp-accounting PLD
TABLE = [
    (0.8, 100, 2.185, 1.511),
    (0.8, 1000, 3.695, 3.141),
    (1.0, 1000, 2.101, 1.828),
    (1.0, 10000, 6.713, 6.188),
    (1.5, 1000, 1.013, 0.918),
]
MIXED = [Release(1.0, 0.01, 300), Release(1.2, 0.02, 150), Release(0.9, 0.005, 600)]


@pytest.mark.parametrize(("sigma", "steps", "rdp", "pld"), TABLE)
def test_known_answers(sigma: float, steps: int, rdp: float, pld: float) -> None:
    history = [Release(sigma, 0.01, steps)]
    assert epsilon(history, 1e-5, "rdp") == pytest.approx(rdp, abs=1e-3)
    # PRV is an upper bound computed to 0.001: at most that far above the PLD value
    prv = epsilon(history, 1e-5, "prv")
    assert pld - 1e-3 <= prv <= pld + 3e-3


def test_mixed_history_known_answer() -> None:
    assert epsilon(MIXED, 1e-5, "rdp") == pytest.approx(1.98334, abs=1e-4)
    assert epsilon(MIXED, 1e-5, "prv") == pytest.approx(1.6896, abs=3e-3)
    assert dp_accounting_epsilon(MIXED, 1e-5, "rdp") == pytest.approx(1.98335, abs=1e-4)
    assert dp_accounting_epsilon(MIXED, 1e-5, "pld") == pytest.approx(1.6896, abs=1e-3)


def test_small_epsilon_is_still_within_one_percent() -> None:
    history = [Release(1.0, 0.005, 1)]
    pld = dp_accounting_epsilon(history, 1e-5, "pld")
    assert abs(epsilon(history, 1e-5, "prv") - pld) <= 0.01 * pld


def test_merging_equal_releases_changes_nothing() -> None:
    split = [Release(1.0, 0.01, 300), Release(1.2, 0.02, 150), Release(1.0, 0.01, 700)]
    assert merged(split) == [Release(1.0, 0.01, 1000), Release(1.2, 0.02, 150)]
    assert epsilon([], 1e-5, "prv") == 0.0


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_calibrated_sigma_spends_the_target_and_no_more(accountant: str) -> None:
    sigma = calibrate_sigma(target_epsilon=3.0, delta=1e-5, q=0.02, steps=500, accountant=accountant)  # type: ignore[arg-type]
    spent = epsilon([Release(sigma, 0.02, 500)], 1e-5, accountant)  # type: ignore[arg-type]
    assert 2.97 < spent <= 3.0
    assert epsilon([Release(sigma * 0.99, 0.02, 500)], 1e-5, accountant) > 3.0  # type: ignore[arg-type]


histories = st.lists(
    st.builds(
        Release,
        sigma=st.sampled_from([0.7, 0.9, 1.0, 1.3, 2.0]),
        q=st.sampled_from([0.005, 0.01, 0.03, 0.1]),
        steps=st.integers(1, 100),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=10, deadline=None)
@given(history=histories, delta=st.sampled_from([1e-5, 1e-6]))
def test_ledger_epsilon_matches_dp_accounting_within_one_percent(
    history: list[Release], delta: float
) -> None:
    """What a site writes (Opacus PRV; RDP) against Google's dp-accounting (PLD; RDP)."""
    prv = epsilon(history, delta, "prv")
    pld = dp_accounting_epsilon(history, delta, "pld")
    assert abs(prv - pld) <= 0.01 * pld
    rdp = epsilon(history, delta, "rdp")
    assert abs(rdp - dp_accounting_epsilon(history, delta, "rdp")) <= 0.01 * rdp
