"""A lower bound on epsilon from one training run (Steinke, Nasr and Jagielski, "Privacy
Auditing with One (1) Training Run", NeurIPS 2023).

The audit: m canaries, each put into the training data independently with probability 1/2
(S_i = +1 in, -1 out). After the run the auditor scores every canary from what it can see and
guesses: "in" for the k+ highest scores, "out" for the k- lowest, and abstains on the rest, so
it makes r = k+ + k- guesses; v of them are right. If the training run is (epsilon, delta)-DP
in each canary, the number of right guesses is stochastically dominated, up to a delta term,
by a Binomial(r, p) with p = e^epsilon / (1 + e^epsilon), the accuracy of epsilon-randomized
response (the paper's Theorem 3, with delta > 0). Concretely, with
f(u) = P[Binomial(r, p) >= u]:

    P[v or more right] <= f(v) + 2 m delta * max_{1 <= i <= v} (f(v - i) - f(v)) / i.

An observed v is significant at level beta against (epsilon, delta) when that right-hand side
(`p_value`) is at most beta; `epsilon_lower_bound` returns the smallest epsilon that the
observation does not reject, so the run is not (epsilon', delta)-DP for any epsilon' below it,
with confidence 1 - beta. With delta = 0 the delta term vanishes and this is the plain binomial
tail test of the paper's pure-DP case.

`audit_scores` tries each (k+, k-) of a grid fixed before looking at the scores (as fractions of
m) and splits beta evenly over the grid (Bonferroni), so the best of the grid is still a valid
lower bound at confidence 1 - beta. The guesses depend on the scores only; ties are broken by
canary index, which the caller assigns independently of the inclusion draws.

The binomial terms are computed in log space (`math.lgamma`), so large r and large epsilon do
not overflow; the search scans epsilon upward in steps of 1/8 until the p-value first reaches
beta, then bisects, so it returns the first crossing even if the p-value were not monotone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_BETA = 0.05
EPSILON_STEP = 0.125
MAX_EPSILON = 60.0
TOLERANCE = 1e-6

# (k+ / m, k- / m): one-sided guesses ("in" only) and two-sided ones, small to large r.
GUESS_GRID: tuple[tuple[float, float], ...] = (
    (0.01, 0.0),
    (0.02, 0.0),
    (0.05, 0.0),
    (0.1, 0.0),
    (0.2, 0.0),
    (0.4, 0.0),
    (0.05, 0.05),
    (0.1, 0.1),
    (0.2, 0.2),
    (0.4, 0.4),
)


def _check_counts(m: int, r: int, v: int) -> None:
    if m < 1:
        raise ValueError(f"`m` (canaries) must be at least 1. Found {m}.")
    if not 0 <= r <= m:
        raise ValueError(f"`r` (guesses) must be within [0, m = {m}]. Found {r}.")
    if not 0 <= v <= r:
        raise ValueError(f"`v` (right guesses) must be within [0, r = {r}]. Found {v}.")


def _check_levels(delta: float, beta: float) -> None:
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"`delta` must be within [0, 1]. Found {delta}.")
    if not 0.0 < beta < 1.0:
        raise ValueError(f"`beta` (1 - confidence) must be within (0, 1). Found {beta}.")


@functools.lru_cache(maxsize=64)
def _log_binomials(r: int) -> np.ndarray:
    """log C(r, u) for u = 0..r (read-only: shared through the cache)."""
    out = np.array([math.lgamma(r + 1) - math.lgamma(u + 1) - math.lgamma(r - u + 1) for u in range(r + 1)])
    out.flags.writeable = False
    return out


def _binomial_pmf(r: int, epsilon: float) -> np.ndarray:
    """P[Binomial(r, e^eps / (1 + e^eps)) = u] for u = 0..r."""
    log_right = -float(np.logaddexp(0.0, -epsilon))  # log p
    log_wrong = -float(np.logaddexp(0.0, epsilon))  # log (1 - p)
    u = np.arange(r + 1, dtype=np.float64)
    pmf: np.ndarray = np.exp(_log_binomials(r) + u * log_right + (r - u) * log_wrong)
    return pmf


def p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Largest probability that an (epsilon, delta)-DP run lets r guesses about m canaries be
    right v or more times (Theorem 3 of Steinke, Nasr and Jagielski 2023; see the module)."""
    _check_counts(m, r, v)
    _check_levels(delta, 0.5)
    if epsilon < 0 or not math.isfinite(epsilon):
        raise ValueError(f"`epsilon` must be finite and non-negative. Found {epsilon}.")
    pmf = _binomial_pmf(r, epsilon)
    tail = float(pmf[v:].sum())
    spread = 0.0
    if v > 0 and delta > 0:
        below = np.cumsum(pmf[v - 1 :: -1])  # i-th entry: P[v - i - 1 <= B < v]
        spread = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * m * delta * spread)


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float = 0.0, beta: float = DEFAULT_BETA) -> float:
    """The smallest epsilon that v right guesses out of r (about m canaries) do not reject at
    level `beta` for (epsilon, `delta`)-DP: with confidence 1 - beta the run is not
    (epsilon', delta)-DP for any epsilon' below it. 0 when even epsilon = 0 is not rejected."""
    _check_counts(m, r, v)
    _check_levels(delta, beta)

    def rejected(epsilon: float) -> bool:
        return p_value(m=m, r=r, v=v, epsilon=epsilon, delta=delta) < beta

    if not rejected(0.0):
        return 0.0
    low = 0.0
    high = EPSILON_STEP
    while rejected(high):
        low, high = high, high + EPSILON_STEP
        if high > MAX_EPSILON:
            return MAX_EPSILON
    while high - low > TOLERANCE:
        middle = (low + high) / 2
        if rejected(middle):
            low = middle
        else:
            high = middle
    return low


@dataclass(frozen=True)
class AuditResult:
    """The best bound over the guess grid, and the guesses that gave it."""

    epsilon: float
    m: int
    r: int
    v: int
    k_plus: int
    k_minus: int
    beta: float
    tests: int


def guesses(scores: np.ndarray, *, k_plus: int, k_minus: int) -> np.ndarray:
    """+1 for the k_plus highest scores, -1 for the k_minus lowest, 0 elsewhere (ties by index)."""
    n = scores.size
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > n:
        raise ValueError(f"k+ = {k_plus} and k- = {k_minus} must be non-negative and sum to at most {n}")
    order = np.argsort(-scores, kind="stable")
    out = np.zeros(n, dtype=np.int64)
    out[order[:k_plus]] = 1
    if k_minus:
        out[order[n - k_minus :]] = -1
    return out


def audit_scores(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    *,
    delta: float,
    beta: float = DEFAULT_BETA,
    grid: Sequence[tuple[float, float]] = GUESS_GRID,
) -> AuditResult:
    """The largest lower bound on epsilon over the guess grid, at confidence 1 - `beta` overall
    (each grid point is tested at beta / len(grid)). A higher score means "more likely in".

    NaN scores are refused: a scorer must say what a missing value means."""
    values = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(included, dtype=bool)
    if values.ndim != 1 or values.shape != truth.shape:
        raise ValueError(
            f"scores {values.shape} and inclusion bits {truth.shape} must be two equal 1-d arrays"
        )
    if not np.isfinite(values).all():
        raise ValueError("scores hold NaN or infinite values; map them to finite scores first")
    if not grid:
        raise ValueError("the guess grid is empty")
    m = values.size
    _check_counts(m, 0, 0)
    _check_levels(delta, beta)
    each = beta / len(grid)
    sign = np.where(truth, 1, -1)
    best: AuditResult | None = None
    for plus, minus in grid:
        k_plus, k_minus = round(plus * m), round(minus * m)
        if k_plus + k_minus == 0 or k_plus + k_minus > m:
            continue
        guess = guesses(values, k_plus=k_plus, k_minus=k_minus)
        r = k_plus + k_minus
        v = int((guess == sign).sum())
        bound = epsilon_lower_bound(m=m, r=r, v=v, delta=delta, beta=each)
        if best is None or bound > best.epsilon:
            best = AuditResult(bound, m, r, v, k_plus, k_minus, beta, len(grid))
    if best is None:
        return AuditResult(0.0, m, 0, 0, 0, 0, beta, len(grid))
    return best
