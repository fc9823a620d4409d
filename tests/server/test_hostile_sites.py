"""A site that sends hostile bytes with its update: its reply is rejected and counted, the round
goes on (issue 15, item 1: one malformed ledger line used to kill the ServerApp)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord

from fedglm.payload import LEDGER_KEY
from fedglm.privacy.keys import public_pem
from fedglm.server.broadcast import Broadcast
from fedglm.server.countersign import Countersigner
from fedglm.server.strategy import REJECTED_PREFIX, FedglmAvg
from tests.server.test_strategy import DENSE_DOWNLINK, SHAPES, FakeReply, replies, update

PEM = public_pem(Ed25519PrivateKey.generate().public_key())


@pytest.mark.parametrize(
    "record",
    [
        {"line": '{"entry": ' + "9" * 5000 + "}", "public-key": PEM},  # a 5,000-digit integer
        {"line": "[" * 100_000 + "]" * 100_000, "public-key": PEM},  # 100,000 nested brackets
        {"line": '{"entry": {}, "entry": {}, "hash": "", "signature": ""}', "public-key": PEM},
        {"line": " " * 5_000_000, "public-key": PEM},
        {"line": "{}", "public-key": PEM, "earlier": ["{}"] * 1000},
        {"line": "{}", "public-key": "-----BEGIN PUBLIC KEY-----" + "A" * 100_000},
    ],
    ids=["huge-integer", "deep-nesting", "duplicate-key", "huge-line", "many-earlier", "huge-key"],
)
def test_a_malformed_ledger_record_is_rejected_and_the_round_goes_on(
    tmp_path: Path, record: dict[str, Any]
) -> None:
    broadcast = Broadcast({name: torch.zeros(shape) for name, shape in SHAPES.items()}, initial=True)
    strategy = FedglmAvg(
        broadcast=broadcast,
        compression=DENSE_DOWNLINK,
        run_key="run",
        min_clients=1,
        countersigner=Countersigner(Ed25519PrivateKey.generate(), tmp_path, "run"),
        require_dp=False,
    )
    honest = FakeReply(update(strategy, 1.0), {}, node=1)
    hostile = FakeReply(update(strategy, 1.0), {}, node=2)
    hostile.content[LEDGER_KEY] = ConfigRecord(record)
    metrics = strategy.aggregate_train(1, replies(honest, hostile))
    assert metrics is not None and metrics["clients"] == 1
    assert metrics[REJECTED_PREFIX + "bad-ledger"] == 1
    assert not list(tmp_path.glob("*.jsonl"))  # nothing countersigned
