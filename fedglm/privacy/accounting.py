"""Epsilon of a site's history of DP-SGD rounds, and the noise that meets a target.

A history is a list of `Release(sigma, q, steps)`: `steps` Poisson-subsampled Gaussian
mechanisms with sampling rate `q` and noise multiplier `sigma` (the Gaussian's standard
deviation over the clipping norm). A release of validation metrics is `Release(z, 1.0, 1)`:
one Gaussian mechanism on every record (`metric_release.py`). Composition is commutative, so
releases with the same (sigma, q) are merged before accounting: that keeps the PRV
accountant's cost independent of the number of rounds.

Accountants (Opacus 1.6): `prv` (the default; a numerical upper bound, computed here with an
epsilon error of at most 0.001 and 0.1% of epsilon, so that claims stay within 1% of an
independent PLD computation even for small epsilon) and `rdp`
(looser, analytical). Opacus' GDP accountant can underestimate and is not offered.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import opacus
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant

AccountantName = Literal["prv", "rdp"]
ACCOUNTANTS: tuple[AccountantName, ...] = ("prv", "rdp")
ACCOUNTANT_VERSION = f"opacus {opacus.__version__}"
PRV_EPS_ERROR = 1e-3
PRV_COARSE_EPS_ERROR = 1e-2
PRV_RELATIVE_ERROR = 1e-3
PRV_MIN_EPS_ERROR = 1e-5
MAX_SIGMA = 1e4
# The RDP orders the site's accountant uses (Opacus' defaults, named so the audit can give
# dp-accounting the same ones).
RDP_ORDERS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS)


@dataclass(frozen=True)
class Release:
    """`steps` DP-SGD steps at sampling rate `q` with noise multiplier `sigma`."""

    sigma: float
    q: float
    steps: int


def merged(history: Iterable[Release]) -> list[Release]:
    """The same privacy loss with one release per distinct (sigma, q)."""
    steps: dict[tuple[float, float], int] = {}
    for release in history:
        if release.steps > 0:
            key = (release.sigma, release.q)
            steps[key] = steps.get(key, 0) + release.steps
    return [Release(sigma, q, n) for (sigma, q), n in steps.items()]


def _accountant(name: AccountantName) -> IAccountant:
    if name == "prv":
        return PRVAccountant()
    if name == "rdp":
        return RDPAccountant()
    raise ValueError(f"unknown accountant {name!r}; choose one of {', '.join(ACCOUNTANTS)}")


def epsilon(
    history: Iterable[Release], delta: float, accountant: AccountantName, *, coarse: bool = False
) -> float:
    """Cumulative epsilon at `delta` of `history` (0 for an empty history).

    `coarse`: PRV with an epsilon error of 0.01, faster, and still an upper bound (for
    calibration, where a slightly high epsilon only means slightly more noise)."""
    releases = merged(history)
    if not releases:
        return 0.0
    acc = _accountant(accountant)
    acc.history = [(r.sigma, r.q, r.steps) for r in releases]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about optimal RDP orders at the edge
        if isinstance(acc, RDPAccountant):
            return float(acc.get_epsilon(delta, alphas=list(RDP_ORDERS)))
        if coarse:
            return float(acc.get_epsilon(delta, eps_error=PRV_COARSE_EPS_ERROR))
        value = float(acc.get_epsilon(delta, eps_error=PRV_EPS_ERROR))
        relative = max(PRV_MIN_EPS_ERROR, PRV_RELATIVE_ERROR * value)
        if relative < PRV_EPS_ERROR:  # a small epsilon: keep the error within 0.1% of it
            value = float(acc.get_epsilon(delta, eps_error=relative))
        return value


def calibrate_sigma(
    *,
    target_epsilon: float,
    delta: float,
    q: float,
    steps: int,
    accountant: AccountantName,
    alongside: tuple[Release, ...] = (),
) -> float:
    """The smallest sigma (to 0.1%) for which `steps` steps at (sigma, q), composed with the
    releases planned `alongside` (the site's metric releases), stay within `target_epsilon`.
    Raises ValueError if even sigma = 1e4 does not."""

    def eps(sigma: float) -> float:
        return epsilon([Release(sigma, q, steps), *alongside], delta, accountant, coarse=True)

    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > MAX_SIGMA:
            raise ValueError(
                f"no noise multiplier up to {MAX_SIGMA:g} keeps epsilon within {target_epsilon:g}"
            )
    while high - low > 1e-3 * high:
        middle = (low + high) / 2
        if eps(middle) > target_epsilon:
            low = middle
        else:
            high = middle
    return high
