"""The sites' validation metrics released under DP, as the coordinator pools them.

Each evaluation asks the sites for their metrics in a window (`federation.site_metrics`):
round 0's is wide, each later round's is centred on the previous round's pooled estimate,
with the configured radius or, while that estimate is noisier (small validation sets), three
times its noise, so that a noisy centre does not clip the sites' records to a wrong value;
every window lies inside the first one, so noise cannot walk the estimates away.
Each site that releases them sends a countersigned ledger line holding its noisy sums and
count (`privacy/metric_release.py`); a line for another window than the one asked for is
left out. The round's `dp_val_loss` (and `dp_val_bpb`) is the uniform mean of the sites'
estimates, as sites count alike in the average; `dp_val_noise` is the standard deviation
its noise implies. Each site's estimate lies within the window, so one hostile site moves
the mean by at most 2 * radius / sites.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from logging import WARNING
from typing import Any

from flwr.common import log

from fedglm.config import SiteMetricsConfig
from fedglm.privacy.ledger import LedgerLine
from fedglm.privacy.metric_release import Released, Window, estimate

NOISE_MARGIN = 3.0  # a window's radius is at least this many times its centre's noise std


@dataclass(frozen=True)
class SiteMetrics:
    """A round's pooled DP estimates and the standard deviations of their noise."""

    loss: float
    bpb: float
    loss_noise: float
    bpb_noise: float
    sites: int

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> SiteMetrics | None:
        """A round's pooled estimates as `metrics.jsonl` holds them (None: that round had none)."""
        keys = ("dp_val_loss", "dp_val_bpb", "dp_val_noise", "dp_val_bpb_noise", "dp_sites")
        if any(row.get(key) is None for key in keys):
            return None
        loss, bpb, loss_noise, bpb_noise = (float(row[key]) for key in keys[:4])
        return cls(loss, bpb, loss_noise, bpb_noise, int(row["dp_sites"]))

    def row(self) -> dict[str, float | int]:
        return {
            "dp_val_loss": self.loss,
            "dp_val_bpb": self.bpb,
            "dp_val_noise": self.loss_noise,
            "dp_val_bpb_noise": self.bpb_noise,
            "dp_sites": self.sites,
        }


class SiteMetricsPool:
    """The window each evaluation asks for, and the pooled estimates of the replies."""

    def __init__(self, config: SiteMetricsConfig | None, previous: SiteMetrics | None = None) -> None:
        self.config = config
        self.window: Window | None = None
        if config is not None:
            first = Window(config.first_centre, config.first_radius)
            self.window = first if previous is None else self._around(previous)

    def _around(self, estimate: SiteMetrics) -> Window:
        """The next window: centred on `estimate`, wide enough for its noise, and inside the
        first window (which holds any loss: a centre beyond it is noise)."""
        assert self.config is not None
        centre, radius = [], []
        for value, noise, wanted, first_centre, first_radius in zip(
            (estimate.loss, estimate.bpb),
            (estimate.loss_noise, estimate.bpb_noise),
            self.config.radius,
            self.config.first_centre,
            self.config.first_radius,
            strict=True,
        ):
            r = min(max(wanted, NOISE_MARGIN * noise), max(wanted, first_radius))
            low, high = first_centre - first_radius + r, first_centre + first_radius - r
            centre.append(first_centre if low > high else min(max(value, low), high))
            radius.append(r)
        return Window((centre[0], centre[1]), (radius[0], radius[1]))

    def pool(self, lines: list[LedgerLine], server_round: int) -> SiteMetrics | None:
        """The pooled estimates of the countersigned metric lines `lines`; the next window
        centres on them."""
        if self.window is None:
            return None
        estimates = []
        for line in lines:
            released = Released.from_json(line.entry["metrics"])
            if released.window != self.window:
                log(
                    WARNING,
                    "round %d: site %s released its metrics for another window than asked; left out",
                    server_round,
                    line.entry["client"],
                )
                continue
            estimates.append(estimate(released, float(line.entry["sigma"])))
        if not estimates:
            return None
        n = len(estimates)
        pooled = SiteMetrics(
            loss=sum(e.loss for e in estimates) / n,
            bpb=sum(e.bpb for e in estimates) / n,
            loss_noise=math.sqrt(sum(e.loss_std**2 for e in estimates)) / n,
            bpb_noise=math.sqrt(sum(e.bpb_std**2 for e in estimates)) / n,
            sites=n,
        )
        self.window = self._around(pooled)
        return pooled
