"""Robust aggregation: the coordinate-wise arithmetic (`fedglm/server/robust.py`) and the
strategy's use of it on clipped, compressed updates (`FedglmAvg(aggregation=...)`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedglm import compression
from fedglm.compression import CODECS, NO_HASH, Header, Kind
from fedglm.compression.update import Selection
from fedglm.payload import payload_record, read_payload
from fedglm.server import robust
from fedglm.server.strategy import FedglmAvg
from tests.server.test_strategy import SHAPES, FakeReply, make_strategy, replies, update

HONEST = (0.009, 0.010, 0.011, 0.012)


# --- the arithmetic ---------------------------------------------------------------------------


def test_trimmed_mean_drops_the_extremes_of_every_coordinate() -> None:
    stacked = np.array([[1.0, -50.0], [2.0, 4.0], [3.0, 5.0], [100.0, 6.0], [-7.0, 1e6]], dtype=np.float32)
    out = robust.trimmed_mean(stacked, 1)
    assert out.dtype == np.float32 and out.shape == (2,)
    np.testing.assert_allclose(out, [2.0, 5.0])  # (1 + 2 + 3) / 3 and (4 + 5 + 6) / 3
    np.testing.assert_allclose(robust.trimmed_mean(stacked, 0), stacked.mean(axis=0), rtol=1e-6)


def test_trimmed_mean_keeps_the_shape_of_each_site_s_tensor() -> None:
    stacked = np.arange(7 * 3 * 2, dtype=np.float32).reshape(7, 3, 2)[::-1].copy()
    out = robust.trimmed_mean(stacked, 2)  # rows 2..4 of the sorted values, i.e. the middle three
    np.testing.assert_array_equal(out, np.sort(stacked, axis=0)[2:5].mean(axis=0))
    assert out.shape == (3, 2)


def test_median_of_odd_and_even_counts() -> None:
    odd = np.array([[5.0], [1.0], [3.0]], dtype=np.float32)
    even = np.array([[5.0], [1.0], [3.0], [10.0]], dtype=np.float32)
    assert robust.median(odd).tolist() == [3.0]
    assert robust.median(even).tolist() == [4.0]  # the mean of the two middle values
    assert robust.median(odd).dtype == np.float32


@pytest.mark.parametrize(
    ("n_sites", "fraction", "expected"),
    [
        (1, 0.4, 0),
        (2, 0.49, 0),  # never so many that nothing is left
        (4, 0.2, 0),  # floor(0.8): too few sites to trim, the plain mean
        (4, 0.25, 1),
        (5, 0.2, 1),
        (9, 0.2, 1),
        (10, 0.2, 2),
        (100, 0.29, 29),  # 0.29 * 100 is 28.999999999999996 in floating point
        (10, 0.0, 0),
    ],
)
def test_trim_count(n_sites: int, fraction: float, expected: int) -> None:
    assert robust.trim_count(n_sites, fraction) == expected


def test_with_too_few_sites_to_trim_the_trimmed_mean_is_the_mean() -> None:
    stacked = np.array([[1.0], [2.0], [4.0], [9.0]], dtype=np.float32)
    assert robust.aggregate(stacked, "trimmed-mean", 0.2).tolist() == [4.0]


@pytest.mark.parametrize("hostile", [1e3, -1e3, 3e38])
@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_one_huge_value_among_five_stays_outside_the_result(hostile: float, rule: robust.RobustRule) -> None:
    honest = np.array(HONEST, dtype=np.float32)
    stacked = np.concatenate([honest, [hostile]]).astype(np.float32).reshape(5, 1)
    out = float(robust.aggregate(stacked, rule, 0.2)[0])
    assert min(HONEST) - 1e-9 <= out <= max(HONEST) + 1e-9
    assert math.isfinite(out)


@pytest.mark.parametrize("fraction", [-0.1, 0.5, 0.7, math.nan])
def test_bad_trim_fractions_are_refused_by_value(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"trim_fraction must be in \[0, 0.5\), got"):
        robust.trim_count(5, fraction)


def test_bad_inputs_are_refused_by_value() -> None:
    with pytest.raises(ValueError, match="n_sites=0"):
        robust.trim_count(0, 0.2)
    with pytest.raises(ValueError, match=r"shape \(0, 3\)"):
        robust.median(np.zeros((0, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="cannot drop 2 values at each end of 4"):
        robust.trimmed_mean(np.zeros((4, 3), dtype=np.float32), 2)
    with pytest.raises(ValueError, match="'max'"):
        robust.aggregate(np.zeros((4, 3), dtype=np.float32), "max", 0.2)  # type: ignore[arg-type]


# --- the strategy -----------------------------------------------------------------------------


def payload_of(
    strategy: FedglmAvg,
    values: dict[str, np.ndarray],
    *,
    codec: str = "dense",
    density: float = 1.0,
    selection: Selection = "per-tensor",
) -> bytes:
    """A round-1 update payload of these flat values (copied: encoding leaves the residual)."""
    header = Header(Kind.UPDATE, CODECS[codec].codec_id, 1, strategy.model.broadcast.hash, NO_HASH)
    arrays = {name: array.astype(np.float32) for name, array in values.items()}
    return compression.encode(arrays, SHAPES, CODECS[codec], header, density=density, selection=selection)


def flat_state(strategy: FedglmAvg) -> np.ndarray:
    return torch.cat([t.reshape(-1) for t in strategy.model.broadcast.state.values()]).numpy()


@pytest.mark.parametrize("hostile", [0.5, 1e30])
def test_a_hostile_site_moves_the_mean_but_not_the_robust_rules(hostile: float) -> None:
    """Five sites; one sends a large update, clipped to 4x the honest norm: still enough to pull
    the mean outside the honest sites' range, not the median or the trimmed mean."""
    models = {}
    for rule in ("mean", "median", "trimmed-mean"):
        strategy = make_strategy(aggregation=rule)
        honest = [FakeReply(update(strategy, v), {}, node=n) for n, v in enumerate(HONEST, start=1)]
        metrics = strategy.train_outcome(
            1, replies(*honest, FakeReply(update(strategy, hostile), {}, node=9))
        )
        assert metrics is not None and metrics.clients == 5 and metrics.clipped == 1
        models[rule] = flat_state(strategy)
    low, high = min(HONEST), max(HONEST)
    assert (models["mean"] > high * 1.2).all()
    for rule in ("median", "trimmed-mean"):
        assert ((models[rule] >= low - 1e-9) & (models[rule] <= high + 1e-9)).all(), rule
    np.testing.assert_allclose(models["median"], 0.011, rtol=1e-6)  # the middle of five
    np.testing.assert_allclose(models["trimmed-mean"], (0.010 + 0.011 + 0.012) / 3, rtol=1e-6)


def test_the_mean_is_the_weighted_mean_of_the_clipped_updates_bit_for_bit() -> None:
    """The default rule's arithmetic: fp32 sum of weight x clip scale x update, then one fp32
    multiplication by 1 / total weight (the results of earlier releases, bit for bit)."""
    rng = np.random.default_rng(7)
    sites = [
        {name: rng.standard_normal(math.prod(s)).astype(np.float32) * scale for name, s in SHAPES.items()}
        for scale in (0.1, 0.2, 0.15, 30.0)  # the last one is clipped by the adaptive bound
    ]
    weights = [3.0, 1.0, 7.0, 2.0]
    strategy = make_strategy("records", aggregation="mean")
    reply_list = [
        FakeReply(
            payload_record(payload_of(strategy, values, codec="fp16")),
            {"weight": w, "records-public": 1},
            node=n,
        )
        for n, (values, w) in enumerate(zip(sites, weights, strict=True), start=1)
    ]
    decoded = [compression.decode(read_payload(r.content) or b"", SHAPES)[1] for r in reply_list]
    metrics = strategy.train_outcome(1, replies(*reply_list))
    assert metrics is not None and metrics.clipped == 1
    bound = float(metrics.norm_bound or 0.0)
    expected = {name: np.zeros(math.prod(s), dtype=np.float32) for name, s in SHAPES.items()}
    for tensors, weight in zip(decoded, weights, strict=True):
        norm = math.sqrt(sum(float(np.dot(t.values.astype(np.float64), t.values)) for t in tensors.values()))
        scale = bound / norm if norm > bound else 1.0
        for name, change in tensors.items():
            expected[name] += np.float32(weight * scale) * change.values
    for name, total in expected.items():
        total *= np.float32(1.0 / sum(weights))
        assert np.array_equal(strategy.model.broadcast.state[name].reshape(-1).numpy(), total), name


def test_robust_rules_ignore_weights() -> None:
    strategy = make_strategy("records", aggregation="median")
    sites = [(1.0, 100.0), (2.0, 1.0), (5.0, 1.0)]
    strategy.train_outcome(
        1,
        replies(
            *(
                FakeReply(update(strategy, v), {"weight": w, "records-public": 1}, node=n)
                for n, (v, w) in enumerate(sites)
            )
        ),
    )
    np.testing.assert_array_equal(flat_state(strategy), 2.0)


def test_a_tensor_a_sparse_payload_left_out_counts_as_zero_for_that_site() -> None:
    strategy = make_strategy(aggregation="median")
    # Global top-k at density 0.5 keeps the 3 largest of 6 values: all in w, so b is left out.
    sparse = payload_of(
        strategy,
        {"w": np.full(4, 10.0), "b": np.full(2, 1e-3)},
        codec="topk",
        density=0.5,
        selection="global",
    )
    assert "b" not in compression.decode(sparse, SHAPES)[1]
    dense = [payload_of(strategy, {"w": np.full(4, v), "b": np.full(2, v)}) for v in (1.0, 2.0)]
    metrics = strategy.train_outcome(
        1, replies(*(FakeReply(payload_record(blob), {}, node=n) for n, blob in enumerate([sparse, *dense])))
    )
    assert metrics is not None and metrics.clients == 3
    state = strategy.model.broadcast.state
    np.testing.assert_array_equal(state["b"].numpy(), 1.0)  # the median of 0, 1 and 2
    assert float(state["w"].reshape(-1)[0]) <= 10.0  # the median of three values, one clipped


def test_no_valid_update_leaves_the_model_alone_with_a_robust_rule() -> None:
    strategy = make_strategy(aggregation="trimmed-mean")
    before = strategy.model.broadcast.hash
    metrics = strategy.train_outcome(1, replies(FakeReply(None, {})))
    assert metrics is not None and metrics.clients == 0
    assert strategy.model.broadcast.hash == before


def test_bad_aggregation_settings_are_refused_by_value() -> None:
    with pytest.raises(ValueError, match="'max'"):
        make_strategy(aggregation="max")
    with pytest.raises(ValueError, match=r"got 0\.5"):
        make_strategy(aggregation="trimmed-mean", trim_fraction=0.5)
