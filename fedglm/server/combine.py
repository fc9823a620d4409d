"""Combining a round's checked updates into one: each site's bound, then the mean or a robust rule.

Each site's contribution is bounded: an update whose L2 norm exceeds the round's bound is
scaled down to it (clipped, not rejected: an honest site with an unusually large update still
counts, with bounded influence). The bound is the smaller of the coordinator's
`federation.max_update_norm` and, with at least three sites, `ADAPTIVE_FACTOR` times the lower
median of the round's update norms, so a minority of sites cannot move the model much further
than honest sites do, and the aggregate stays finite whatever arrives (norms in float64).

The clipped updates are then combined by the weighted mean (decoded one at a time into one
preallocated fp32 accumulator: memory linear in the model, not in the sites), or by the
coordinate-wise trimmed mean or median (`robust.py`), decoded tensor by tensor so the extra
memory is (number of sites) x (largest tensor). The payloads were fully checked before.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from fedglm.compression import CODEC_IDS, Decoded, decode
from fedglm.compression.update import payload_limit
from fedglm.compression.wire import unpack
from fedglm.server.robust import RobustRule, aggregate

ADAPTIVE_FACTOR = 4.0  # a site's update may be this many times the round's lower-median norm
Shapes = Mapping[str, tuple[int, ...]]


def update_norm(tensors: Iterable[Decoded]) -> float:
    """The L2 norm of a decoded update, in float64 (finite for any finite fp32 values)."""
    total = 0.0
    for tensor in tensors:
        values = tensor.values.astype(np.float64)
        total += float(np.dot(values, values))
    return math.sqrt(total)


def norm_bound(norms: list[float], max_update_norm: float) -> float:
    """The largest L2 norm one site's update may have this round (see the module docstring)."""
    positive = sorted(n for n in norms if n > 0)
    adaptive = ADAPTIVE_FACTOR * positive[(len(positive) - 1) // 2] if len(positive) >= 3 else math.inf
    return min(max_update_norm, adaptive)


def weighted_mean(
    out: dict[str, np.ndarray], blobs: list[bytes], weights: list[float], scales: list[float], shapes: Shapes
) -> None:
    """`out` = the weighted mean of the clipped updates (zero without any update)."""
    for total in out.values():
        total.fill(0.0)
    weight_sum = 0.0
    for blob, weight, scale in zip(blobs, weights, scales, strict=True):
        # Decoded again rather than kept: memory stays linear in the model, not in the sites.
        _, tensors = decode(blob, shapes)
        for name, change in tensors.items():
            change.add_to(out[name], weight * scale)
        weight_sum += weight
    if blobs:
        for total in out.values():
            total *= np.float32(1.0 / weight_sum)


def robust_combine(
    out: dict[str, np.ndarray],
    blobs: list[bytes],
    scales: list[float],
    shapes: Shapes,
    rule: RobustRule,
    trim_fraction: float,
) -> None:
    """`out` = the robust rule applied to the clipped updates, tensor by tensor.

    Each payload's table is parsed once (its bodies stay views into the payload); each tensor is
    then decoded from every payload into one (sites, size) stack, so at most one tensor's values
    from every site are held at a time. A tensor a sparse payload left out is zero for that site.
    """
    if not blobs:
        for total in out.values():
            total.fill(0.0)
        return
    limit = payload_limit(shapes)
    tables = []
    for blob in blobs:
        payload = unpack(blob, shapes, limit)
        tables.append((CODEC_IDS[payload.header.codec_id], {t.name: t.body for t in payload.tensors}))
    for name, total in out.items():
        stacked = np.zeros((len(blobs), total.size), dtype=np.float32)
        for row, ((codec, bodies), scale) in enumerate(zip(tables, scales, strict=True)):
            body = bodies.get(name)
            if body is not None:
                codec.decode(body, total.size).add_to(stacked[row], scale)
        total[:] = aggregate(stacked, rule, trim_fraction)
        del stacked  # freed before the next tensor's stack is allocated
