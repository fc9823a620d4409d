"""Coordinate-wise robust aggregation: the trimmed mean and the median of the sites' updates.

Why: the mean of the sites' updates moves with every value any one site sends. The per-site
norm bound (`strategy.py`) caps how far one site can pull it, but within that bound a single
hostile site still shifts every coordinate of the mean by up to 1/n of its bounded update, and
a few colluding sites by proportionally more. The coordinate-wise median and trimmed mean of
Yin, Chen, Ramchandran and Bartlett ("Byzantine-robust distributed learning: towards optimal
statistical rates", ICML 2018) instead take, at every coordinate, a value inside the range the
majority of sites sent: the median ignores any minority of fewer than half the sites; the
trimmed mean drops the `k` largest and `k` smallest values at each coordinate and averages the
rest, tolerating up to `k` hostile sites at each end.

Where: the coordinator applies them after the per-site norm clipping, to the clipped updates of
the sites whose payloads passed every check. Clipping bounds the size of what a site sends;
the robust rule then bounds its say in each coordinate, so both apply.

What it costs:
- Quality on a clean run. With honest but non-IID sites the median and trimmed mean discard
  real information (the sites that disagree are not hostile, just different), so the model
  learns more slowly than with the mean; `bench/robust.py` measures it on MTSamples. With
  sparse uplink codecs (`topk`, `ternary`) a coordinate a site did not send counts as zero for
  that site, as it does in the mean: the median of a coordinate is then zero whenever fewer
  than half the sites sent it, which shrinks the round's step further.
- Weights are ignored: every accepted site counts once (with uniform weighting, the default,
  that is what the mean does too).
- Memory and time: the values of one tensor from every site are held at once, so the extra
  memory is a small multiple (the stack plus the copy `np.partition` or `np.median` makes) of
  (number of sites) x (largest tensor), instead of one fp32 accumulator; selection is linear in
  the number of sites per coordinate.

This module is the arithmetic only (arrays in, array out); `strategy.py` decodes the updates
tensor by tensor and calls `aggregate`.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

RobustRule = Literal["trimmed-mean", "median"]
ROBUST_RULES: tuple[RobustRule, ...] = ("trimmed-mean", "median")
# floor(fraction * n) computed in floating point can land just under an integer (0.29 * 100 is
# 28.999999999999996); this much is added before rounding down.
_FLOOR_SLACK = 1e-9


def check_trim_fraction(trim_fraction: float) -> None:
    """Refuse a fraction outside [0, 0.5): at 0.5 nothing would be left to average."""
    if not (isinstance(trim_fraction, int | float) and 0.0 <= trim_fraction < 0.5):
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")


def trim_count(n_sites: int, trim_fraction: float) -> int:
    """How many values the trimmed mean drops at each end of a coordinate among `n_sites`.

    floor(trim_fraction x n_sites), and never so many that nothing is left: with too few sites
    to trim anything (say 0.2 of 4 sites: floor(0.8) = 0) the trimmed mean is the plain mean."""
    check_trim_fraction(trim_fraction)
    if n_sites < 1:
        raise ValueError(f"need at least one site to aggregate, got n_sites={n_sites}")
    count = math.floor(trim_fraction * n_sites + _FLOOR_SLACK)
    return min(count, (n_sites - 1) // 2)


def trimmed_mean(stacked: np.ndarray, trim: int) -> np.ndarray:
    """The mean over axis 0 of `stacked` after dropping its `trim` smallest and `trim` largest
    values at every coordinate (fp32 result, accumulated in fp64)."""
    n = _site_count(stacked)
    if not (trim >= 0 and 2 * trim < n):
        raise ValueError(f"cannot drop {trim} values at each end of {n}")
    if trim == 0:
        plain: np.ndarray = stacked.mean(axis=0, dtype=np.float64).astype(np.float32)
        return plain
    # After partitioning at both cut points, rows trim..n-trim-1 hold exactly the middle values
    # of every coordinate (in no particular order, which the mean does not need).
    kept = np.partition(stacked, (trim, n - trim - 1), axis=0)[trim : n - trim]
    trimmed: np.ndarray = kept.mean(axis=0, dtype=np.float64).astype(np.float32)
    return trimmed


def median(stacked: np.ndarray) -> np.ndarray:
    """The median over axis 0 of `stacked` (the mean of the two middle values for an even count)."""
    _site_count(stacked)
    middle: np.ndarray = np.median(stacked, axis=0).astype(np.float32)
    return middle


def aggregate(stacked: np.ndarray, rule: RobustRule, trim_fraction: float = 0.2) -> np.ndarray:
    """Combine the sites' values of one tensor, `stacked` of shape (n_sites, ...), by `rule`."""
    if rule == "median":
        return median(stacked)
    if rule == "trimmed-mean":
        return trimmed_mean(stacked, trim_count(_site_count(stacked), trim_fraction))
    raise ValueError(f"unknown robust aggregation rule {rule!r}; expected one of {ROBUST_RULES}")


def _site_count(stacked: np.ndarray) -> int:
    if stacked.ndim < 1 or stacked.shape[0] < 1:
        raise ValueError(f"need an array of shape (n_sites >= 1, ...), got shape {stacked.shape}")
    return int(stacked.shape[0])
