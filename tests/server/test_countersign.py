"""The coordinator countersigns a ledger line only if it matches the update it came with."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedglm.compression import PayloadError
from fedglm.privacy.keys import key_id, public_pem
from fedglm.privacy.ledger import FORMAT, GENESIS, entry_hash, sign_line
from fedglm.privacy.receipts import read_receipts, receipt_ok
from fedglm.privacy.site import metrics_digest
from fedglm.server.countersign import Countersigner

BLOB = b"compressed update bytes"
BASE = bytes(range(32))


def entry(**changes: Any) -> dict[str, Any]:
    fields = {
        "format": FORMAT,
        "client": "site-a",
        "key": "",
        "run": "run-1",
        "round": 3,
        "sequence": 0,
        "unit": "record",
        "sampler": "poisson",
        "q": 0.05,
        "sigma": 1.0,
        "steps": 20,
        "clip_norm": 1.0,
        "delta": 1e-5,
        "accountant": "prv",
        "accountant_version": "opacus 1.6.0",
        "epsilon": 1.5,
        "budget": 8.0,
        "expected_batch": 16.0,
        "record_count_public": False,
        "mode": "hooks",
        "precision": "bf16",
        "model_received": BASE.hex(),
        "update_sent": hashlib.sha256(BLOB).hexdigest(),
        "config_hash": "cd" * 32,
        "prev": GENESIS,
        "time": "2026-11-21T00:00:00+00:00",
        "release": "update",
        "metrics": {},
    }
    fields.update(changes)
    fields["key"] = key_id(SITE_KEY.public_key()) if "key" not in changes else changes["key"]
    return fields


SITE_KEY = Ed25519PrivateKey.generate()


def ledger_record(fields: dict[str, Any], key: Ed25519PrivateKey = SITE_KEY) -> dict[str, Any]:
    return {"line": json.dumps(sign_line(fields, key)), "public-key": public_pem(key.public_key())}


@pytest.fixture
def desk(tmp_path: Path) -> Countersigner:
    return Countersigner(Ed25519PrivateKey.generate(), tmp_path / "receipts", "run-1")


def test_a_matching_entry_is_countersigned_and_the_receipt_sent_once(desk: Countersigner) -> None:
    desk.countersign(7, ledger_record(entry()), BLOB, 3, BASE)
    [receipt] = desk.receipt_for(7)
    assert desk.receipt_for(7) == []
    stored, problems = read_receipts(desk.folder / "site-a.jsonl")
    assert not problems and json.loads(receipt) == {
        "receipt": stored[0].body,
        "signature": stored[0].signature,
    }
    assert receipt_ok(stored[0], desk.key.public_key())
    assert desk.epsilon == {"site-a": 1.5}


@pytest.mark.parametrize(
    ("changes", "blob", "server_round", "base", "what"),
    [
        ({"round": 2}, BLOB, 3, BASE, "round"),
        ({"run": "run-0"}, BLOB, 3, BASE, "run"),
        ({}, BLOB + b"!", 3, BASE, "what was sent"),
        ({}, BLOB, 3, bytes(32), "model received"),
        ({"epsilon": 9.0}, BLOB, 3, BASE, "epsilon within budget"),
        ({"client": "../../etc"}, BLOB, 3, BASE, "client is a site name"),
        ({"sampler": "shuffle"}, BLOB, 3, BASE, "needs sampler poisson"),
        ({"unit": "patient"}, BLOB, 3, BASE, "unit"),
    ],
)
def test_a_mismatching_entry_is_refused(
    desk: Countersigner, changes: dict[str, Any], blob: bytes, server_round: int, base: bytes, what: str
) -> None:
    with pytest.raises(PayloadError, match=what) as raised:
        desk.countersign(7, ledger_record(entry(**changes)), blob, server_round, base)
    assert raised.value.reason == "bad-ledger"
    assert desk.receipt_for(7) == [] and not list(desk.folder.glob("*.jsonl"))


def test_a_bad_signature_and_a_changed_key_are_refused(desk: Countersigner) -> None:
    record = ledger_record(entry())
    record["public-key"] = public_pem(Ed25519PrivateKey.generate().public_key())
    with pytest.raises(PayloadError, match="signature"):
        desk.countersign(7, record, BLOB, 3, BASE)
    desk.countersign(7, ledger_record(entry()), BLOB, 3, BASE)
    other = Ed25519PrivateKey.generate()
    with pytest.raises(PayloadError, match="pinned key"):
        desk.countersign(7, ledger_record(entry(key=key_id(other.public_key())), other), BLOB, 3, BASE)


def test_receipts_survive_a_coordinator_restart(desk: Countersigner) -> None:
    desk.countersign(7, ledger_record(entry(epsilon=2.5)), BLOB, 3, BASE)
    again = Countersigner(desk.key, desk.folder, "run-2")
    assert again.epsilon == {"site-a": 2.5}
    assert again.site_keys["site-a"] == entry()["key"]


@pytest.mark.parametrize("record", [{}, {"line": "{", "public-key": "x"}, {"line": "{}", "public-key": 3}])
def test_malformed_ledger_records_are_refused(desk: Countersigner, record: dict[str, Any]) -> None:
    with pytest.raises(PayloadError):
        desk.countersign(7, record, BLOB, 3, BASE)


def test_a_site_is_accepted_once_a_round(desk: Countersigner) -> None:
    """A second node sending the same site's update (a resend is no new contribution)."""
    desk.countersign(7, ledger_record(entry()), BLOB, 3, BASE)
    with pytest.raises(PayloadError, match="a second update release from 'site-a' this round") as raised:
        desk.countersign(8, ledger_record(entry()), BLOB, 3, BASE)
    assert raised.value.reason == "duplicate-site"


VALUES = {"centre": [8.0, 4.0], "radius": [8.0, 4.0], "sums": [-120.5, -80.25], "count": 101.5}


def metrics_entry(**changes: Any) -> dict[str, Any]:
    """A site's release of its validation metrics (the Gaussian mechanism, `metric_release.py`)."""
    values = changes.pop("metrics", VALUES)
    fields = {
        "release": "metrics",
        "sampler": "none",
        "q": 1.0,
        "steps": 1,
        "clip_norm": 1.0,
        "sigma": 5.0,
        "mode": "gaussian",
        "expected_batch": 1.0,
        "metrics": values,
        "update_sent": metrics_digest(values),
        "epsilon": 0.73,
    }
    return entry(**{**fields, **changes})


def test_a_metric_release_is_countersigned_beside_the_rounds_update(desk: Countersigner) -> None:
    line = desk.countersign(7, ledger_record(metrics_entry(round=3)), None, 3, BASE)
    assert line.entry["metrics"] == VALUES
    update = entry(sequence=1, prev=line.hash, epsilon=1.5)
    desk.countersign(7, ledger_record(update), BLOB, 3, BASE)  # the same round's update: another release
    assert len(desk.receipt_for(7)) == 2
    with pytest.raises(PayloadError, match="a second metrics release"):
        desk.countersign(
            7, ledger_record(metrics_entry(sequence=2, prev=entry_hash(update), epsilon=2.0)), None, 3, BASE
        )


@pytest.mark.parametrize(
    ("line", "update", "what"),
    [
        # values changed after the digest was taken: what was sent is not what is recorded
        (lambda: dict(metrics_entry(), metrics={**VALUES, "count": 5000.0}), None, "what was sent"),
        # an update's line sent as the metrics (and the reverse)
        (lambda: entry(), None, "release metrics"),
        (lambda: metrics_entry(), BLOB, "release update"),
        # metrics of another model than the one evaluated
        (lambda: metrics_entry(model_received="00" * 32), None, "model received"),
    ],
)
def test_a_metric_line_that_does_not_match_is_refused(
    desk: Countersigner, line: Any, update: bytes | None, what: str
) -> None:
    with pytest.raises(PayloadError, match=what) as raised:
        desk.countersign(7, ledger_record(line()), update, 3, BASE)
    assert raised.value.reason == "bad-ledger"
    assert desk.receipt_for(7) == []


def test_a_metric_line_with_sampling_or_another_sensitivity_is_malformed(desk: Countersigner) -> None:
    """A metrics line claiming subsampling (q < 1) or a clip other than 1 would understate epsilon."""
    for changes in ({"q": 0.01}, {"clip_norm": 0.5}, {"sampler": "poisson"}, {"steps": 2}):
        with pytest.raises(PayloadError, match="a metrics line needs sampler none, q 1"):
            desk.countersign(7, ledger_record(metrics_entry(**changes)), None, 3, BASE)
