"""A site spends its budget once per round, even when the coordinator asks for the round again
(it crashed mid-round and resumed from its last checkpoint): the real ClientApp handler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.common import MessageType

from fedglm.clients.app import evaluate_global, train
from fedglm.config import PrivacyConfig, TrainConfig
from fedglm.errors import InputError
from fedglm.payload import LEDGER_KEY, read_payload
from fedglm.privacy.site import LEDGER_FILE, SENT_FILE, privacy_dir
from fedglm.protocol import CENTRE_KEY, RADIUS_KEY
from fedglm.server.countersign import Countersigner
from tests.clients.handler import coordinator_state, site_context, train_message

TRAIN = TrainConfig(local_steps=1, seq_len=32)
PRIVACY = PrivacyConfig(sample_rate=0.5, noise_multiplier=1.0, rounds=2)


def _ledger_lines(tmp_path: Path) -> list[str]:
    return (privacy_dir(tmp_path / "state") / LEDGER_FILE).read_text().splitlines()


def test_a_round_asked_again_gets_the_same_update_and_no_new_entry(tmp_path: Path, tiny_base: Path) -> None:
    context = site_context(tmp_path, [f"note {i}: stable" for i in range(30)], PRIVACY, base=tiny_base)
    message, broadcast = train_message(tiny_base, TRAIN)
    first = train(message, context)
    # The coordinator dies before its checkpoint, resumes, and sends round 1 again.
    again, _ = train_message(tiny_base, TRAIN)
    second = train(again, context)

    assert len(_ledger_lines(tmp_path)) == 1
    assert read_payload(second.content) == read_payload(first.content)
    assert (
        second.content.config_records[LEDGER_KEY]["line"] == first.content.config_records[LEDGER_KEY]["line"]
    )
    # ... and the resumed coordinator, which countersigned it before crashing, takes it once more.
    desk = Countersigner(Ed25519PrivateKey.generate(), tmp_path / "receipts", "run")
    blob = read_payload(first.content)
    assert blob is not None
    desk.countersign(1, dict(first.content.config_records[LEDGER_KEY]), blob, 1, broadcast.hash)
    resumed = Countersigner(desk.key, desk.folder, "run")
    resumed.countersign(1, dict(second.content.config_records[LEDGER_KEY]), blob, 1, broadcast.hash)
    assert resumed.receipt_for(1) == desk.receipt_for(1)  # the same receipt, sent again
    assert len((tmp_path / "receipts" / "h1.jsonl").read_text().splitlines()) == 1


def test_a_round_asked_again_with_another_model_is_refused_not_trained_twice(
    tmp_path: Path, tiny_base: Path
) -> None:
    context = site_context(tmp_path, [f"note {i}: stable" for i in range(30)], PRIVACY, base=tiny_base)
    train(train_message(tiny_base, TRAIN)[0], context)
    # round 1 again, from another starting model (the base moved a little), sent in full
    state, _ = coordinator_state(tiny_base, TRAIN)
    other, _ = train_message(tiny_base, TRAIN, state={name: t + 0.01 for name, t in state.items()})
    with pytest.raises(InputError, match=r"round 1 of run run is already in this site's ledger \(entry 0\)"):
        train(other, context)
    assert len(_ledger_lines(tmp_path)) == 1


def test_a_round_asked_again_whose_update_is_gone_is_refused(tmp_path: Path, tiny_base: Path) -> None:
    context = site_context(tmp_path, [f"note {i}: stable" for i in range(30)], PRIVACY, base=tiny_base)
    train(train_message(tiny_base, TRAIN)[0], context)
    (privacy_dir(tmp_path / "state") / SENT_FILE).unlink()
    with pytest.raises(InputError, match="its update is no longer kept"):
        train(train_message(tiny_base, TRAIN)[0], context)
    assert len(_ledger_lines(tmp_path)) == 1


def test_a_round_asked_again_after_its_metrics_were_released_gets_the_same_update(
    tmp_path: Path, tiny_base: Path
) -> None:
    """Train round 1, release round 1's metrics, then the coordinator (resumed from round 0's
    checkpoint) asks for round 1 again: the update is sent again, the metrics line between
    the two changes nothing, and no new entry is written."""
    context = site_context(tmp_path, [f"note {i}: stable" for i in range(30)], PRIVACY, base=tiny_base)
    first = train(train_message(tiny_base, TRAIN)[0], context)
    window = {CENTRE_KEY: [8.0, 4.0], RADIUS_KEY: [8.0, 4.0]}
    evaluated, _ = train_message(tiny_base, TRAIN, extra=window, message_type=MessageType.EVALUATE)
    evaluate_global(evaluated, context)
    assert [json.loads(x)["entry"]["release"] for x in _ledger_lines(tmp_path)] == ["update", "metrics"]
    second = train(train_message(tiny_base, TRAIN)[0], context)
    assert read_payload(second.content) == read_payload(first.content)
    assert len(_ledger_lines(tmp_path)) == 2
