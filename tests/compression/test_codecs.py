"""The five codecs: exact error feedback, decode == encode's own view, and known answers.

The known-answer bodies below are worked out by hand from `compression/FORMAT.md`, not by
running the encoder, so they pin the format independently of the implementation.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedglm.compression import CODECS, Decoded
from fedglm.compression.codecs import INT8_BLOCK
from fedglm.compression.select import keep_count, top_k
from tests.compression.helpers import hypothesis_settings

SETTINGS = hypothesis_settings(200)
SPARSE = [name for name, codec in CODECS.items() if codec.sparse]
DENSE = [name for name, codec in CODECS.items() if not codec.sparse]


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _same(a: Decoded, b: Decoded) -> bool:
    if (a.positions is None) != (b.positions is None):
        return False
    if a.positions is not None and b.positions is not None and not np.array_equal(a.positions, b.positions):
        return False
    return a.values.dtype == b.values.dtype == np.float32 and np.array_equal(_bits(a.values), _bits(b.values))


@st.composite
def windows(draw: st.DrawFn) -> tuple[int, int]:
    """(lo, span): magnitudes in [2^lo, 2^(lo+span+1)), within [~1e-30, ~1e20] and a range below 1e35."""
    lo = draw(st.integers(-100, 66))
    span = draw(st.integers(0, min(90, 66 - lo)))
    return lo, span


def _values(rng: np.random.Generator, n: int, lo: int, span: int, pattern: str, zeros: float) -> np.ndarray:
    signs = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    if pattern == "loguniform":
        mags = np.exp2(rng.uniform(lo, lo + span + 1, n))
    elif pattern == "ties":  # few distinct magnitudes: ties at the selection threshold
        mags = np.exp2(lo + rng.integers(0, span + 1, n)) * rng.choice([1.0, 1.5, 1.75], n)
    elif pattern == "powers":  # exact powers of two: the exponent's edge cases
        mags = np.exp2(lo + rng.integers(0, span + 1, n).astype(np.float64))
    else:  # "constant"
        mags = np.full(n, 2.0 ** (lo + span / 2))
    out = (signs * mags).astype(np.float32)
    out[rng.random(n) < zeros] = 0.0
    if n > 2 and pattern != "constant":
        out[rng.integers(0, n)] = np.float32(2.0**lo)  # the window's extremes are present
        out[rng.integers(0, n)] = np.float32(-(2.0 ** (lo + span)))
    assert np.isfinite(out).all()
    return out


@st.composite
def updates(draw: st.DrawFn, max_size: int = 3000) -> tuple[np.ndarray, np.ndarray]:
    """(x, old_residual): two finite fp32 arrays of the same size and magnitude window."""
    low, high = draw(st.sampled_from([(1, 8), (9, 300), (301, max_size)]))
    lo, span = draw(windows())
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n = int(rng.integers(low, high + 1))
    x_pattern = draw(st.sampled_from(["loguniform", "ties", "powers", "constant"]))
    x = _values(rng, n, lo, span, x_pattern, draw(st.sampled_from([0.0, 0.2, 0.9, 1.0])))
    r = _values(rng, n, lo, span, "loguniform", draw(st.sampled_from([0.0, 0.5, 1.0])))
    return x, r


densities = st.one_of(
    st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
    st.sampled_from([1.0, 0.5, 0.05, 0.01, 1e-9]),
)


def _check_error_feedback(
    codec_name: str, u: np.ndarray, density: float, threshold: float | None = None
) -> None:
    codec = CODECS[codec_name]
    n = u.size
    body, decoded = codec.encode(u.copy(), density=density, threshold=threshold)
    residual = u.copy()
    decoded.add_to(residual, -1.0)
    dense = decoded.dense(n)
    assert dense.dtype == np.float32 and dense.shape == (n,)
    assert np.isfinite(dense).all() and np.isfinite(residual).all()
    assert np.array_equal(_bits(dense + residual), _bits(u)), "decoded + residual != u"
    again = codec.decode(memoryview(body), n)
    assert _same(again, decoded), "decode(body) differs from what encode reported"
    if decoded.positions is not None:
        p = decoded.positions
        assert p.dtype == np.int64
        assert (np.diff(p) > 0).all() and (p.size == 0 or (p[0] >= 0 and p[-1] < n))
        assert (u[p] != 0).all(), "a sparse codec sent an exact zero"
        if threshold is None:
            assert p.size <= keep_count(n, density)


@pytest.mark.parametrize("codec_name", list(CODECS))
@SETTINGS
@given(data=updates(), density=densities)
def test_error_feedback_is_exact(
    codec_name: str, data: tuple[np.ndarray, np.ndarray], density: float
) -> None:
    x, old_residual = data
    u = x + old_residual
    assert u.dtype == np.float32 and np.isfinite(u).all()
    _check_error_feedback(codec_name, u, density)


@pytest.mark.parametrize("codec_name", SPARSE)
@settings(SETTINGS, max_examples=60)
@given(data=updates(), pick=st.integers(0, 2**31))
def test_error_feedback_is_exact_with_a_global_threshold(
    codec_name: str, data: tuple[np.ndarray, np.ndarray], pick: int
) -> None:
    u = data[0] + data[1]
    threshold = float(np.abs(u[pick % u.size])) or float(np.finfo(np.float32).smallest_subnormal)
    _check_error_feedback(codec_name, u, 0.5, threshold)
    _, decoded = CODECS[codec_name].encode(u.copy(), density=0.5, threshold=threshold)
    assert decoded.positions is not None
    candidates = set(np.flatnonzero(np.abs(u) >= np.float32(threshold)).tolist())
    assert set(decoded.positions.tolist()) <= candidates
    if codec_name == "topk":
        assert set(decoded.positions.tolist()) == candidates


@pytest.mark.parametrize("codec_name", list(CODECS))
def test_error_feedback_on_hand_picked_extremes(codec_name: str) -> None:
    cases = [
        np.array([0.0], dtype=np.float32),
        np.array([1e20, -1e20, 1e-14, 0.0, 3.0], dtype=np.float32),
        np.array([1e-30, -2e-30, 5e-31, 0.0], dtype=np.float32),
        np.array([65504.0, 65520.0, -1e5, 7e4, 1.0], dtype=np.float32),
        np.float32(2.0) ** np.arange(-100, 66, dtype=np.float32),
        np.nextafter(np.float32(2.0) ** np.arange(-100, 66, dtype=np.float32), np.float32(0)),
    ]
    for u in cases:
        for density in (1.0, 0.5, 0.1, 1e-6):
            _check_error_feedback(codec_name, u, density)


# --- per-codec properties ------------------------------------------------------------------


def _topk_fields(body: bytes) -> tuple[int, int, int, int]:
    """(k, exponent, index coder, index code length) of a topk body."""
    k, e, coder, length = struct.unpack_from("<IbBI", body)
    return k, e, coder, length


@SETTINGS
@given(data=updates(), density=densities)
def test_topk_exponent_and_precision(data: tuple[np.ndarray, np.ndarray], density: float) -> None:
    u = data[0] + data[1]
    body, decoded = CODECS["topk"].encode(u.copy(), density=density)
    k, e, _, length = _topk_fields(body)
    assert decoded.positions is not None and k == decoded.positions.size
    assert len(body) == 4 + 1 + 5 + length + 2 * k
    kept = u[decoded.positions]
    peak = float(np.max(np.abs(kept))) if k else 0.0
    assert e == (math.ceil(math.log2(peak)) - 15 if peak else 0)
    halves = np.frombuffer(body[-2 * k :] if k else b"", dtype="<f2").astype(np.float64)
    assert np.all(np.abs(halves) <= 2.0**15)
    normal = np.abs(kept) >= 2.0 ** (e - 14)  # lands in fp16's normal range after scaling
    err = np.abs(decoded.values.astype(np.float64) - kept)
    assert np.all(err[normal] <= 2.0**-11 * np.abs(kept[normal]))


@SETTINGS
@given(data=updates(), density=densities)
def test_ternary_mu_is_the_mean_of_the_kept_values(
    data: tuple[np.ndarray, np.ndarray], density: float
) -> None:
    u = data[0] + data[1]
    n = u.size
    body, decoded = CODECS["ternary"].encode(u.copy(), density=density)
    k, mu = struct.unpack_from("<If", body)
    assert decoded.positions is not None and k == decoded.positions.size
    selected = top_k(u, keep_count(n, density))
    magnitudes = np.abs(u[selected]).astype(np.float64)
    if selected.size == 0:
        assert k == 0
        return
    mean = float(np.float32(magnitudes.mean()))
    fraction, exponent = math.frexp(mean)  # mean = fraction * 2^exponent, 0.5 <= fraction < 1
    scaled = fraction * 256  # 8 significant bits: an integer in [128, 256]
    below, above = math.floor(scaled), math.floor(scaled) + 1
    nearest = (
        {below}
        if scaled - below < above - scaled
        else {above}
        if scaled - below > above - scaled
        else {below, above}
    )
    assert mu in {math.ldexp(c, exponent - 8) for c in nearest}, "mu is not the kept values' mean to 8 bits"
    assert set(decoded.positions.tolist()) <= set(selected.tolist())
    dropped = np.abs(u[np.setdiff1d(selected, decoded.positions)])
    assert np.all((dropped < mu / 2) | (dropped > mu * 2.0**16))
    assert np.all(np.abs(u[decoded.positions]) >= mu / 2)
    expected = np.where(u[decoded.positions] < 0, -np.float32(mu), np.float32(mu))
    assert np.array_equal(_bits(decoded.values), _bits(expected))


@SETTINGS
@given(data=updates())
def test_int8_levels_and_block_scales(data: tuple[np.ndarray, np.ndarray]) -> None:
    u = data[0] + data[1]
    n = u.size
    body, decoded = CODECS["int8"].encode(u.copy(), density=1.0)
    blocks = -(-n // INT8_BLOCK)
    (block,) = struct.unpack_from("<I", body)
    assert block == INT8_BLOCK and len(body) == 4 + 4 * blocks + n
    scales = np.frombuffer(body[4 : 4 + 4 * blocks], dtype="<f4")
    levels = np.frombuffer(body[4 + 4 * blocks :], dtype=np.int8)
    assert levels.min() >= -127 and levels.max() <= 127
    for b in range(blocks):
        part = u[b * block : (b + 1) * block]
        assert scales[b] == np.abs(part).max() / np.float32(127)
    expected = levels.astype(np.float32) * np.repeat(scales, block)[:n]
    assert np.array_equal(_bits(decoded.values), _bits(expected))


# --- known answers, worked out by hand from FORMAT.md --------------------------------------


def test_dense_known_answer() -> None:
    values = np.array([1.0, -2.5, 0.0], dtype=np.float32)
    body, decoded = CODECS["dense"].encode(values.copy(), density=1.0)
    assert body == bytes.fromhex("0000803f000020c000000000")
    assert np.array_equal(decoded.values, values)


def test_fp16_known_answer() -> None:
    # peak 1 -> e = ceil(log2 1) - 15 = -15; halves 2^15, -2^14, 2^13
    body, decoded = CODECS["fp16"].encode(np.array([1.0, -0.5, 0.25], dtype=np.float32), density=1.0)
    assert body == bytes.fromhex("f1007800f40070")
    assert decoded.values.tolist() == [1.0, -0.5, 0.25]


def test_topk_known_answer() -> None:
    values = np.array([0, 3, -1, 0.5, 0, -4], dtype=np.float32)
    body, decoded = CODECS["topk"].encode(values.copy(), density=2 / 6)
    assert decoded.positions is not None
    assert decoded.positions.tolist() == [1, 5]
    assert decoded.values.tolist() == [3.0, -4.0]
    # k = 2; e = ceil(log2 4) - 15 = -13; Elias-Fano with l = floor(log2(6 // 2)) = 1:
    # low bits 1, 1 -> 0x03; high parts 0, 2 -> bits 0 + 0 and 2 + 1 of 2 + (5 >> 1) + 1 = 5 -> 0x09;
    # values 3 * 2^13 = 24576 (fp16 0x7600), -4 * 2^13 = -32768 (fp16 0xf800)
    expected = (
        struct.pack("<I", 2)
        + struct.pack("<b", -13)
        + bytes([0])
        + struct.pack("<I", 2)
        + bytes([0x03, 0x09])
    )
    expected += bytes.fromhex("007600f8")
    assert body == expected
    assert _same(CODECS["topk"].decode(memoryview(body), 6), decoded)


def test_ternary_known_answer_uses_the_mean_of_the_kept_values() -> None:
    values = np.array([0, 1, -2, 3, 0.1, -4, 0, 0.2], dtype=np.float32)
    body, decoded = CODECS["ternary"].encode(values.copy(), density=5 / 8)
    # top 5 magnitudes: positions 1, 2, 3, 5, 7 (1, 2, 3, 4, 0.2); their mean 2.04 (over all 8
    # values it would be 1.2875); to 8 significant bits 131/128 * 2 = 2.046875. Positions below
    # mu / 2 = 1.0234375 (values 1 and 0.2) are dropped: 2, 3, 5 remain, sent as -mu, +mu, -mu.
    mu = 2.046875
    assert decoded.positions is not None
    assert decoded.positions.tolist() == [2, 3, 5]
    assert decoded.values.tolist() == [-mu, mu, -mu]
    # Elias-Fano, k = 3 of n = 8: l = floor(log2(8 // 3)) = 1; low bits 0, 1, 1 -> 0x06;
    # high parts 1, 1, 2 -> bits 1, 2, 4 of 3 + (7 >> 1) + 1 = 7 -> 0x16; signs 1, 0, 1 -> 0x05
    expected = struct.pack("<If", 3, mu) + bytes([0]) + struct.pack("<I", 2) + bytes([0x06, 0x16, 0x05])
    assert body == expected
    assert _same(CODECS["ternary"].decode(memoryview(body), 8), decoded)


def test_int8_known_answer() -> None:
    values = np.array([127, -63.4, 0.5, 1.5, -127, 2.6], dtype=np.float32)
    body, decoded = CODECS["int8"].encode(values.copy(), density=1.0)
    # one block (size 1024), scale 127 / 127 = 1; levels round half to even
    assert body == struct.pack("<If", 1024, 1.0) + np.array([127, -63, 0, 2, -127, 3], np.int8).tobytes()
    assert decoded.values.tolist() == [127, -63, 0, 2, -127, 3]


def test_int8_scales_per_block() -> None:
    rng = np.random.default_rng(0)
    values = rng.standard_normal(2 * INT8_BLOCK + 500).astype(np.float32)
    values[INT8_BLOCK : 2 * INT8_BLOCK] *= 1000
    body, decoded = CODECS["int8"].encode(values.copy(), density=1.0)
    scales = np.frombuffer(body[4:16], dtype="<f4")
    for b in range(3):
        assert scales[b] == np.abs(values[b * INT8_BLOCK : (b + 1) * INT8_BLOCK]).max() / np.float32(127)
    assert np.all(
        np.abs(decoded.values - values) <= np.repeat(scales, INT8_BLOCK)[: values.size] / 2 * 1.0001
    )


def test_fp16_large_values_do_not_overflow() -> None:
    cases = [
        np.array([1e20, -3e19, 5e19, 1e18, -1e19], dtype=np.float32),
        np.array([7e4, 1e5, 65504, -65520, -9e4], dtype=np.float32),
    ]
    for values in cases:
        with np.errstate(over="ignore"):
            assert not np.isfinite(values.astype(np.float16)).all()  # plain fp16 would overflow
        for name in ("fp16", "topk"):
            body, decoded = CODECS[name].encode(values.copy(), density=1.0)
            out = decoded.dense(values.size)
            assert np.isfinite(out).all()
            assert np.all(np.abs(out - values) <= 2.0**-11 * np.abs(values))
            assert _same(CODECS[name].decode(memoryview(body), values.size), decoded)


def test_fp16_small_values_keep_three_digits() -> None:
    rng = np.random.default_rng(1)
    values = (rng.uniform(1e-6, 1e-5, 1000) * rng.choice([-1, 1], 1000)).astype(np.float32)
    naive = values.astype(np.float16).astype(np.float32)
    assert np.max(np.abs(naive - values) / np.abs(values)) > 1e-2  # plain fp16 is subnormal here
    for name in ("fp16", "topk"):
        _, decoded = CODECS[name].encode(values.copy(), density=1.0)
        sent = values if decoded.positions is None else values[decoded.positions]
        assert sent.size > 900
        assert np.max(np.abs(decoded.values - sent) / np.abs(sent)) < 1e-3


def test_sparse_codecs_keep_nothing_of_zeros() -> None:
    for name in SPARSE:
        body, decoded = CODECS[name].encode(np.zeros(50, dtype=np.float32), density=0.5)
        assert decoded.positions is not None and decoded.positions.size == 0
        assert struct.unpack_from("<I", body)[0] == 0
        assert _same(CODECS[name].decode(memoryview(body), 50), decoded)
