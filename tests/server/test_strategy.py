import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedglm import compression
from fedglm.compression import CODECS, NO_HASH, Header, Kind
from fedglm.config import CompressionConfig, LinkConfig, ModelConfig, TrainConfig
from fedglm.payload import ARRAYS_KEY, LEDGER_KEY, METRICS_KEY, payload_record
from fedglm.protocol import RoundConfig
from fedglm.server.broadcast import Broadcast
from fedglm.server.countersign import Countersigner
from fedglm.server.global_model import GlobalModel
from fedglm.server.ledger_check import LedgerCheck
from fedglm.server.strategy import FedglmAvg

SHAPES = {"w": (2, 2), "b": (2,)}
DENSE_DOWNLINK = CompressionConfig(downlink=LinkConfig(codec="dense"))


class FakeReply:
    """A reply as the strategy reads it: content, metadata.src_node_id, errors."""

    def __init__(
        self, arrays: ArrayRecord | None, metrics: dict[str, Any], node: int = 1, error: str | None = None
    ) -> None:
        content = RecordDict({METRICS_KEY: MetricRecord(metrics)})
        if arrays is not None:
            content[ARRAYS_KEY] = arrays
        self.content = content
        self.metadata = type("M", (), {"src_node_id": node})()
        self.error = type("E", (), {"reason": error})()

    def has_error(self) -> bool:
        return self.error.reason is not None


def make_strategy(
    weighting: str = "uniform",
    *,
    countersigner: Countersigner | None = None,
    max_update_norm: float = math.inf,
    aggregation: str = "mean",
    trim_fraction: float = 0.2,
    require_dp: bool = False,
) -> FedglmAvg:
    """Averaging of dense updates that does not require DP (a ledger is checked if sent)."""
    broadcast = Broadcast({name: torch.zeros(shape) for name, shape in SHAPES.items()}, initial=True)
    return FedglmAvg(
        model=GlobalModel(broadcast),
        ledgers=LedgerCheck(countersigner, required=require_dp),
        settings=RoundConfig(model=ModelConfig(), train=TrainConfig(), seed=0, run_key="run"),
        compression=DENSE_DOWNLINK,
        min_clients=1,
        weighting=weighting,  # type: ignore[arg-type]
        max_update_norm=max_update_norm,
        aggregation=aggregation,  # type: ignore[arg-type]
        trim_fraction=trim_fraction,
    )


def update(
    strategy: FedglmAvg, value: float, *, round: int = 1, codec: str = "dense", base: bytes | None = None
) -> ArrayRecord:
    values = {name: np.full(int(np.prod(s)), value, dtype=np.float32) for name, s in SHAPES.items()}
    header = Header(
        Kind.UPDATE, CODECS[codec].codec_id, round, base or strategy.model.broadcast.hash, NO_HASH
    )
    return payload_record(compression.encode(values, SHAPES, CODECS[codec], header, density=1.0))


def replies(*items: FakeReply) -> list[Message]:
    return list(items)


def test_uniform_average_of_updates_moves_the_broadcast_model() -> None:
    strategy = make_strategy()
    metrics = strategy.train_outcome(
        1,
        replies(
            FakeReply(
                update(strategy, 1.0), {"train_loss": 2.0, "weight": 100.0, "records-public": 1}, node=1
            ),
            FakeReply(update(strategy, 3.0), {"train_loss": 4.0, "weight": 1.0, "records-public": 0}, node=2),
        ),
    )
    assert metrics is not None and metrics.train_loss == 3.0 and metrics.clients == 2
    assert torch.equal(strategy.model.broadcast.state["w"], torch.full((2, 2), 2.0))
    assert strategy.model.broadcast.holders == {
        1: strategy.model.broadcast.previous,
        2: strategy.model.broadcast.previous,
    }


def test_record_weights_only_when_every_site_declares_them() -> None:
    strategy = make_strategy("records")
    public = [
        FakeReply(update(strategy, 1.0), {"weight": 3.0, "records-public": 1}),
        FakeReply(update(strategy, 5.0), {"weight": 1.0, "records-public": 1}),
    ]
    strategy.train_outcome(1, replies(*public))
    assert torch.equal(strategy.model.broadcast.state["b"], torch.full((2,), 2.0))
    strategy = make_strategy("records")
    mixed = [
        FakeReply(update(strategy, 1.0), {"weight": 3.0, "records-public": 1}),
        FakeReply(update(strategy, 5.0), {"weight": 1.0, "records-public": 0}),
    ]
    strategy.train_outcome(1, replies(*mixed))
    assert torch.equal(strategy.model.broadcast.state["b"], torch.full((2,), 3.0))


def _corrupt(record: ArrayRecord) -> ArrayRecord:
    """The last value of a dense update set to NaN, with a valid checksum."""
    blob = bytes(record["payload"].data)
    body = blob[:-36] + np.array([np.nan], dtype="<f4").tobytes()
    return payload_record(body + hashlib.sha256(body).digest())


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (lambda s: update(s, 1.0, round=2), "wrong-round"),
        (lambda s: update(s, 1.0, base=b"\x01" * 32), "stale-base"),
        (lambda s: ArrayRecord({"w": Array(np.zeros((2, 2), np.float32))}), "bad-record"),
        (lambda s: None, "no-payload"),
        (lambda s: payload_record(b"FGLM" + b"\x00" * 10), "truncated"),
        (lambda s: payload_record(bytes(update(s, 1.0)["payload"].data)[:-1] + b"\x00"), "checksum"),
        (lambda s: _corrupt(update(s, 1.0)), "non-finite"),
    ],
)
def test_bad_updates_are_left_out_and_counted(bad: Any, reason: str) -> None:
    strategy = make_strategy()
    metrics = strategy.train_outcome(
        1, replies(FakeReply(bad(strategy), {}, node=1), FakeReply(update(strategy, 7.0), {}, node=2))
    )
    assert metrics is not None and metrics.clients == 1
    assert metrics.rejections[reason] == 1
    assert torch.equal(strategy.model.broadcast.state["w"], torch.full((2, 2), 7.0))
    assert 1 not in strategy.model.broadcast.holders


def test_no_valid_update_leaves_the_model_alone() -> None:
    strategy = make_strategy()
    before = strategy.model.broadcast.hash
    metrics = strategy.train_outcome(1, replies(FakeReply(None, {})))
    assert metrics is not None and metrics.clients == 0
    assert strategy.model.broadcast.hash == before


def test_evaluate_means_and_marks_holders() -> None:
    strategy = make_strategy()
    metrics = strategy.evaluate_outcome(
        1,
        replies(
            FakeReply(None, {"val_loss": 1.0, "val_bpb": 2.0}, node=4),
            FakeReply(None, {"val_loss": 3.0}, node=5),
        ),
    )
    assert metrics is not None
    assert (metrics.val_loss, metrics.val_bpb, metrics.clients) == (2.0, 2.0, 2)
    assert set(strategy.model.broadcast.holders) == {4, 5}


def test_a_declining_site_is_counted_and_not_selected_for_training_again() -> None:
    strategy = make_strategy()
    declined = FakeReply(None, {"declined": 1, "epsilon": 7.9}, node=2)
    declined.content[LEDGER_KEY] = ConfigRecord({"declined": "declined: past the site's budget of 8"})
    metrics = strategy.train_outcome(1, replies(FakeReply(update(strategy, 1.0), {}, node=1), declined))
    assert metrics is not None and metrics.clients == 1 and metrics.declined == 1
    assert strategy.exhausted == {2}


def test_dp_required_refuses_an_update_without_a_ledger_entry(tmp_path: Path) -> None:
    strategy = make_strategy(
        countersigner=Countersigner(Ed25519PrivateKey.generate(), tmp_path, "run"), require_dp=True
    )
    metrics = strategy.train_outcome(1, replies(FakeReply(update(strategy, 1.0), {}, node=1)))
    assert metrics.clients == 0 and metrics.rejections == {"no-ledger": 1}
    with pytest.raises(ValueError, match="countersigner"):
        LedgerCheck(None, required=True)
