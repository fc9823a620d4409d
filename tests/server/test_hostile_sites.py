"""A site that sends hostile bytes with its update: its reply is rejected and counted, the round
goes on (issue 15, item 1: one malformed ledger line used to kill the ServerApp)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord

from fedglm.compression import PayloadError
from fedglm.payload import LEDGER_KEY
from fedglm.privacy.keys import key_id, public_pem
from fedglm.server.countersign import WRONG_SITE, Countersigner
from tests.server.test_countersign import BASE, BLOB, entry, ledger_record
from tests.server.test_strategy import FakeReply, make_strategy, replies, update

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
    strategy = make_strategy(countersigner=Countersigner(Ed25519PrivateKey.generate(), tmp_path, "run"))
    honest = FakeReply(update(strategy, 1.0), {}, node=1)
    hostile = FakeReply(update(strategy, 1.0), {}, node=2)
    hostile.content[LEDGER_KEY] = ConfigRecord(record)
    metrics = strategy.train_outcome(1, replies(honest, hostile))
    assert metrics is not None and metrics.clients == 1
    assert metrics.rejections["bad-ledger"] == 1
    assert not list(tmp_path.glob("*.jsonl"))  # nothing countersigned


@pytest.mark.parametrize("value", [2e38, 1e30])
def test_huge_updates_are_clipped_and_the_model_stays_finite_and_bounded(value: float) -> None:
    """Two sites send every value 2e38 (the sum used to overflow and kill the run), or one
    finite 1e30 update (it used to replace the global model)."""
    strategy = make_strategy(max_update_norm=1000.0)
    honest = [FakeReply(update(strategy, 0.01), {}, node=n) for n in (1, 2, 3)]
    hostile = [FakeReply(update(strategy, value), {}, node=n) for n in (4, 5)]
    metrics = strategy.train_outcome(1, replies(*honest, *hostile))
    assert metrics is not None and metrics.clients == 5 and metrics.clipped == 2
    bound = metrics.norm_bound
    honest_norm = 0.01 * 6**0.5  # six values of 0.01
    assert bound is not None and bound == pytest.approx(4 * honest_norm, rel=1e-5)
    state = torch.cat([t.reshape(-1) for t in strategy.model.broadcast.state.values()])
    assert bool(torch.isfinite(state).all())
    # the average moved no further than five sites at the bound would move it
    assert float(state.norm()) <= bound * (1 + 1e-5)
    strategy.train_outcome(2, replies(FakeReply(update(strategy, 0.01), {}, node=1)))  # the run goes on


def test_the_coordinators_bound_applies_with_few_sites() -> None:
    strategy = make_strategy(max_update_norm=1.0)
    metrics = strategy.train_outcome(1, replies(FakeReply(update(strategy, 3e38), {}, node=1)))
    assert metrics is not None and metrics.clipped == 1 and metrics.norm_bound == 1.0
    state = torch.cat([t.reshape(-1) for t in strategy.model.broadcast.state.values()])
    assert bool(torch.isfinite(state).all()) and float(state.norm()) <= 1.0 + 1e-5


def test_a_second_site_under_a_taken_name_is_refused_and_the_real_site_is_not_locked_out(
    tmp_path: Path,
) -> None:
    """Node 2 (listed as site-b) connects first and claims site-a with a key of its own: it used
    to pin site-a's key and lock the real hospital out for good, or join under N names."""
    desk = Countersigner(Ed25519PrivateKey.generate(), tmp_path, "run-1", nodes={1: "site-a", 2: "site-b"})
    rogue = Ed25519PrivateKey.generate()
    rogue_entry = entry(key=key_id(rogue.public_key()))
    with pytest.raises(PayloadError, match="node 2 is listed for site 'site-b', not 'site-a'") as raised:
        desk.countersign(2, ledger_record(rogue_entry, rogue), BLOB, 3, BASE)
    assert raised.value.reason == WRONG_SITE
    with pytest.raises(PayloadError, match="node 9 is listed for site None"):  # no listed node at all
        desk.countersign(9, ledger_record(rogue_entry, rogue), BLOB, 3, BASE)
    assert "site-a" not in desk.site_keys
    desk.countersign(1, ledger_record(entry()), BLOB, 3, BASE)  # the real hospital
    assert desk.site_keys["site-a"] == entry()["key"]


def test_hostile_metrics_and_error_text_leave_the_round_going(caplog: pytest.LogCaptureFixture) -> None:
    """Metrics a site sends as lists, NaN or infinities count as absent (they used
    to reach `float()` and raise out of the aggregation), and an error reply's megabyte of text
    is logged as one short line."""
    strategy = make_strategy(weighting="records")
    hostile_metrics: list[dict[str, Any]] = [
        {"train_loss": [1.0, 2.0], "weight": [3.0], "records-public": 1},
        {"train_loss": float("nan"), "weight": float("inf"), "records-public": 1},
        {"train_loss": 10**30, "weight": -5.0, "records-public": 1},
    ]
    honest = FakeReply(
        update(strategy, 0.01), {"train_loss": 2.0, "weight": 10.0, "records-public": 1}, node=1
    )
    others = [FakeReply(update(strategy, 0.01), m, node=n) for n, m in enumerate(hostile_metrics, start=2)]
    metrics = strategy.train_outcome(1, replies(honest, *others))
    assert metrics is not None and metrics.clients == 4
    assert metrics.train_loss == pytest.approx((2.0 + 1e30) / 2)  # finite numbers count, as sent
    evaluated = strategy.evaluate_outcome(
        1, replies(*(FakeReply(None, {"val_loss": [1.0]}, node=n) for n in (1, 2)))
    )
    assert evaluated is not None and evaluated.val_loss is None

    failed = FakeReply(None, {}, node=7, error="\x1b[31m" + "A" * 1_000_000)
    with caplog.at_level("WARNING"):
        strategy.evaluate_outcome(1, replies(failed))
    [line] = [r.getMessage() for r in caplog.records if "replied with an error" in r.getMessage()]
    assert len(line) < 300 and "\x1b" not in line
