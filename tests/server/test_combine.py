"""Each site's bound, then the weighted mean of the clipped updates."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedglm import compression
from fedglm.compression import CODECS, NO_HASH, Header, Kind
from fedglm.server.combine import ADAPTIVE_FACTOR, norm_bound, weighted_mean

SHAPES = {"w": (3,)}


def payload(values: list[float]) -> bytes:
    header = Header(Kind.UPDATE, CODECS["dense"].codec_id, 1, b"\x00" * 32, NO_HASH)
    return compression.encode({"w": np.array(values, dtype=np.float32)}, SHAPES, CODECS["dense"], header)


def test_the_bound_is_the_coordinators_cap_and_with_three_sites_a_multiple_of_the_lower_median() -> None:
    assert norm_bound([1.0, 2.0], 10.0) == 10.0  # fewer than three sites: the cap alone
    assert norm_bound([1.0, 2.0, 1e30], 100.0) == ADAPTIVE_FACTOR * 2.0
    assert norm_bound([1.0, 2.0, 3.0, 1e30], 100.0) == ADAPTIVE_FACTOR * 2.0  # the lower median
    assert norm_bound([0.0, 0.0, 0.0], 5.0) == 5.0  # zero updates say nothing about scale
    assert math.isinf(norm_bound([], math.inf))


def test_the_weighted_mean_uses_each_weight_and_clip_scale() -> None:
    out = {"w": np.zeros(3, dtype=np.float32)}
    blobs = [payload([1.0, 1.0, 1.0]), payload([4.0, 4.0, 4.0])]
    weighted_mean(out, blobs, [3.0, 1.0], [1.0, 0.5], SHAPES)
    assert out["w"] == pytest.approx([(3 * 1.0 + 1 * 2.0) / 4] * 3)
    weighted_mean(out, [], [], [], SHAPES)
    assert not out["w"].any()  # nothing accepted: zero, not the last round's sum
