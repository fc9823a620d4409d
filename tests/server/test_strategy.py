from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedglm.payload import ARRAYS_KEY, METRICS_KEY
from fedglm.server.strategy import FedglmAvg

SHAPES = {"w": (2, 2), "b": (2,)}


class FakeReply:
    """A reply as the strategy reads it: content, metadata.src_node_id, errors."""

    def __init__(self, arrays: dict[str, Any] | None, metrics: dict[str, Any], node: int = 1) -> None:
        content = RecordDict({METRICS_KEY: MetricRecord(metrics)})
        if arrays is not None:
            content[ARRAYS_KEY] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
        self.content = content
        self.metadata = type("M", (), {"src_node_id": node})()

    def has_error(self) -> bool:
        return False


def state(value: float) -> dict[str, Any]:
    return {
        "w": np.full((2, 2), value, dtype=np.float32),
        "b": np.full((2,), value, dtype=np.float32),
    }


def replies(*items: FakeReply) -> list[Message]:
    return list(items)  # type: ignore[arg-type]


def test_uniform_average_ignores_record_counts() -> None:
    strategy = FedglmAvg(expected=SHAPES, min_clients=2)
    arrays, metrics = strategy.aggregate_train(
        1,
        replies(
            FakeReply(state(1.0), {"train_loss": 2.0, "weight": 100.0, "records-public": 1}),
            FakeReply(state(3.0), {"train_loss": 4.0, "weight": 1.0, "records-public": 0}),
        ),
    )
    assert arrays is not None and metrics is not None
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((2, 2), 2.0))
    assert metrics["train_loss"] == 3.0 and metrics["clients"] == 2


def test_record_weights_only_when_every_site_declares_them() -> None:
    strategy = FedglmAvg(expected=SHAPES, min_clients=2, weighting="records")
    public = [
        FakeReply(state(1.0), {"weight": 3.0, "records-public": 1}),
        FakeReply(state(5.0), {"weight": 1.0, "records-public": 1}),
    ]
    arrays, _ = strategy.aggregate_train(1, replies(*public))
    assert arrays is not None
    assert torch.allclose(arrays.to_torch_state_dict()["b"], torch.full((2,), 2.0))
    mixed = [public[0], FakeReply(state(5.0), {"weight": 1.0, "records-public": 0})]
    arrays, _ = strategy.aggregate_train(1, replies(*mixed))
    assert arrays is not None
    assert torch.allclose(arrays.to_torch_state_dict()["b"], torch.full((2,), 3.0))


@pytest.mark.parametrize(
    "bad",
    [
        {"w": np.full((2, 2), np.nan, dtype=np.float32), "b": np.zeros(2, dtype=np.float32)},
        {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)},
        {"w": np.zeros((2, 2), dtype=np.float64), "b": np.zeros(2, dtype=np.float32)},
        {"w": np.zeros((2, 2), dtype=np.float32)},
        None,
    ],
)
def test_bad_replies_are_dropped_not_averaged(bad: dict[str, Any] | None) -> None:
    strategy = FedglmAvg(expected=SHAPES, min_clients=1)
    arrays, metrics = strategy.aggregate_train(1, replies(FakeReply(bad, {}), FakeReply(state(7.0), {})))
    assert arrays is not None and metrics is not None and metrics["clients"] == 1
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((2, 2), 7.0))


def test_no_valid_reply_gives_nothing() -> None:
    strategy = FedglmAvg(expected=SHAPES, min_clients=1)
    assert strategy.aggregate_train(1, replies(FakeReply(None, {}))) == (None, None)


def test_evaluate_means() -> None:
    strategy = FedglmAvg(expected=SHAPES, min_clients=1)
    metrics = strategy.aggregate_evaluate(
        1,
        replies(FakeReply(None, {"val_loss": 1.0, "val_bpb": 2.0}), FakeReply(None, {"val_loss": 3.0})),
    )
    assert metrics is not None
    assert (metrics["val_loss"], metrics["val_bpb"], metrics["clients"]) == (2.0, 2.0, 2)
