"""A site's validation loss and bits per byte, released under DP (the Gaussian mechanism).

Each validation record i has l_i, its mean next-token loss (nats), and b_i, its bits per
UTF-8 byte. The coordinator names a window per metric, a centre c and a radius r
(`Window`, sent with the round): its own choice, which moves only the estimate's accuracy,
never the guarantee. Record i contributes

    v_i = (clip(l_i - c_l, -r_l, r_l) / r_l,  clip(b_i - c_b, -r_b, r_b) / r_b,  1) / sqrt(3),

of L2 norm at most 1, so adding or removing one record moves sum_i v_i by at most 1, and
releasing sum_i v_i + N(0, z^2 I) is the Gaussian mechanism with noise multiplier z: for an
accountant, one step at sampling rate 1 (`accounting.Release(z, 1.0, 1)`; dp-accounting's
`GaussianDpEvent(z)`). It is recorded in the ledger in natural units (`Released`): the sums
of clipped deviations S_l and S_b (noise std z sqrt(3) r) and the record count n (noise std
z sqrt(3)).

The coordinator's estimate of the site's mean is c + clip(S / max(n, 1), -r, r): arithmetic
on released values only (nothing is divided by a private count), and the clip to the window
can only bring it closer, since every clipped deviation lies within it.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fedglm.training import RecordLoss

RELEASED_KEYS = ("centre", "radius", "sums", "count")
MAX_WINDOW = 1e4  # a centre or radius beyond this is not a loss
SQRT3 = math.sqrt(3.0)


@dataclass(frozen=True)
class Window:
    """The coordinator's centre and radius for (loss, bits per byte) in one round."""

    centre: tuple[float, float]
    radius: tuple[float, float]

    def problem(self) -> str | None:
        """Why this window cannot be used, or None."""
        values = [*self.centre, *self.radius]
        if len(self.centre) != 2 or len(self.radius) != 2 or not all(math.isfinite(v) for v in values):
            return "expected two finite centres and two finite radii"
        if not all(abs(v) <= MAX_WINDOW for v in values) or not all(r > 0 for r in self.radius):
            return f"centres must lie within +-{MAX_WINDOW:g} and radii in (0, {MAX_WINDOW:g}]"
        return None


@dataclass(frozen=True)
class Released:
    """What leaves the site: the window used, the noisy sums of clipped deviations, the noisy count."""

    window: Window
    sums: tuple[float, float]
    count: float

    def as_json(self) -> dict[str, Any]:
        return {
            "centre": list(self.window.centre),
            "radius": list(self.window.radius),
            "sums": list(self.sums),
            "count": self.count,
        }

    @classmethod
    def from_json(cls, value: Any) -> Released:
        """Read a ledger entry's `metrics` object (checked with `check_released` first)."""
        reason = check_released(value)
        if reason is not None:
            raise ValueError(reason)
        return cls(
            Window(tuple(value["centre"]), tuple(value["radius"])),
            tuple(value["sums"]),
            float(value["count"]),
        )


def check_released(value: Any) -> str | None:
    """Why a ledger entry's `metrics` object is malformed, or None."""
    if not isinstance(value, dict) or set(value) != set(RELEASED_KEYS):
        return f"metrics must be an object with exactly {', '.join(RELEASED_KEYS)}"
    pairs = [value[key] for key in ("centre", "radius", "sums")]
    if not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        return "metrics centre, radius and sums must be lists of two numbers"
    numbers = [*pairs[0], *pairs[1], *pairs[2], value["count"]]
    if not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in numbers):
        return "metrics values must be finite numbers"
    return Window(tuple(pairs[0]), tuple(pairs[1])).problem()


def record_metrics(losses: Sequence[RecordLoss], n_bytes: Sequence[int]) -> list[tuple[float, float]]:
    """(mean loss, bits per byte) of each record that predicts at least one token."""
    return [
        (loss.nll / loss.tokens, loss.nll / math.log(2) / max(size, 1))
        for loss, size in zip(losses, n_bytes, strict=True)
        if loss.tokens > 0
    ]


def release(
    per_record: Sequence[tuple[float, float]],
    window: Window,
    noise_multiplier: float,
    rng: np.random.Generator | None = None,
) -> Released:
    """The Gaussian mechanism of the module docstring on `per_record` (loss, bits per byte)."""
    rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    values = np.asarray(per_record, dtype=np.float64).reshape(-1, 2)
    centre, radius = np.asarray(window.centre), np.asarray(window.radius)
    # A record whose loss is not finite (a model crafted to overflow on a trigger) counts at the
    # window's upper edge: its contribution stays bounded and nothing fails on it.
    deviations = np.nan_to_num(values - centre, nan=np.inf)
    deviations = np.clip(deviations, -radius, radius).sum(axis=0)
    noise = rng.normal(0.0, noise_multiplier * SQRT3, size=3)
    sums = deviations + noise[:2] * radius
    return Released(window, (float(sums[0]), float(sums[1])), float(len(values) + noise[2]))


@dataclass(frozen=True)
class Estimate:
    """A site's released metrics as means, with the standard deviation their noise implies."""

    loss: float
    bpb: float
    loss_std: float
    bpb_std: float


def estimate(released: Released, noise_multiplier: float) -> Estimate:
    """The site's mean loss and bits per byte from its release (post-processing only)."""
    count = max(released.count, 1.0)
    means, stds = [], []
    for centre, radius, total in zip(
        released.window.centre, released.window.radius, released.sums, strict=True
    ):
        deviation = min(max(total / count, -radius), radius)
        means.append(centre + deviation)
        # S / n with noise on both: to first order, std z sqrt(3) sqrt(r^2 + deviation^2) / n
        spread = noise_multiplier * SQRT3 * math.hypot(radius, deviation) / count
        stds.append(min(spread, radius))
    return Estimate(means[0], means[1], stds[0], stds[1])
