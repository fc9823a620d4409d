"""DP required, as a step apart from the averaging."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord

from fedglm.payload import LEDGER_KEY, PayloadError
from fedglm.server.countersign import Countersigner
from fedglm.server.ledger_check import LedgerCheck
from tests.server.test_countersign import BASE, BLOB, entry, ledger_record
from tests.server.test_strategy import FakeReply


def reply(ledger: dict[str, object] | None, node: int = 7) -> FakeReply:
    sent = FakeReply(None, {}, node=node)
    if ledger is not None:
        sent.content[LEDGER_KEY] = ConfigRecord(ledger)
    return sent


def test_with_dp_required_an_update_needs_a_countersigned_entry(tmp_path: Path) -> None:
    check = LedgerCheck(Countersigner(Ed25519PrivateKey.generate(), tmp_path, "run-1"), required=True)
    with pytest.raises(PayloadError, match="without a ledger entry") as raised:
        check.check(reply(None), BLOB, 3, BASE)
    assert raised.value.reason == "no-ledger"
    check.check(reply(ledger_record(entry())), BLOB, 3, BASE)
    assert check.epsilon() == {"site-a": 1.5} and len(check.receipts_for(7)) == 1
    assert check.receipts_for(7) == []  # sent once


def test_without_dp_required_an_entry_sent_anyway_is_still_checked(tmp_path: Path) -> None:
    check = LedgerCheck(None, required=False)
    check.check(reply(None), BLOB, 3, BASE)
    with pytest.raises(PayloadError, match="no receipt key") as raised:
        check.check(reply(ledger_record(entry())), BLOB, 3, BASE)
    assert raised.value.reason == "bad-ledger"
    assert check.epsilon() == {} and check.receipts_for(7) == []
    with pytest.raises(ValueError, match="countersigner"):
        LedgerCheck(None, required=True)
