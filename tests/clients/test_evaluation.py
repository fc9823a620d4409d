"""A site's evaluation through the real ClientApp handler: its validation metrics released under
DP (ledger line, budget, once per round), or nothing private at all."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Context, Message
from flwr.common import MessageType

from fedglm.clients.app import evaluate_global, train
from fedglm.compression import PayloadError
from fedglm.config import PrivacyConfig, ShareConfig, TrainConfig
from fedglm.config.site import MetricsPrivacyConfig
from fedglm.data import split_records
from fedglm.payload import LEDGER_KEY, METRICS_KEY
from fedglm.privacy.accounting import Release, epsilon
from fedglm.privacy.metric_release import Released, estimate
from fedglm.privacy.site import LEDGER_FILE, privacy_dir
from fedglm.protocol import CENTRE_KEY, RADIUS_KEY
from fedglm.server.broadcast import Broadcast
from fedglm.server.countersign import Countersigner
from tests.clients.handler import site_context, train_message

TRAIN = TrainConfig(local_steps=1, seq_len=32)
PRIVACY = PrivacyConfig(sample_rate=0.5, noise_multiplier=1.0, rounds=2)
WINDOW = {CENTRE_KEY: [8.0, 4.0], RADIUS_KEY: [8.0, 4.0]}
NOTES = [f"note {i}: the patient is stable, follow up in {i % 7 + 1} weeks" for i in range(300)]


def _ledger(tmp_path: Path) -> list[dict[str, Any]]:
    path = privacy_dir(tmp_path / "state") / LEDGER_FILE
    return [json.loads(line)["entry"] for line in path.read_text().splitlines()] if path.exists() else []


def _evaluate(
    tmp_path: Path,
    base: Path,
    *,
    extra: dict[str, Any] | None = WINDOW,
    privacy: PrivacyConfig = PRIVACY,
    share: ShareConfig | None = None,
) -> tuple[Context, Message, Broadcast]:
    context = site_context(tmp_path, NOTES, privacy, base=base, share=share)
    message, broadcast = train_message(
        base, TRAIN, server_round=0, extra=extra, message_type=MessageType.EVALUATE
    )
    return context, message, broadcast


def test_the_metrics_leave_only_noised_in_a_countersigned_line(tmp_path: Path, tiny_base: Path) -> None:
    context, message, broadcast = _evaluate(tmp_path, tiny_base)
    reply = evaluate_global(message, context)

    metrics = reply.content.metric_records[METRICS_KEY]
    assert set(metrics) == {"weight", "records-public"}  # no exact loss leaves the site
    entries = _ledger(tmp_path)
    assert len(entries) == 1
    entry = entries[0]
    assert (entry["release"], entry["sampler"], entry["q"], entry["steps"], entry["sigma"]) == (
        "metrics",
        "none",
        1.0,
        1,
        PRIVACY.metrics.noise_multiplier,
    )
    assert entry["epsilon"] == pytest.approx(epsilon([Release(5.0, 1.0, 1)], 1e-5, "prv"), rel=1e-6)
    assert entry["metrics"]["centre"] == [8.0, 4.0] and entry["model_received"] == broadcast.hash.hex()
    desk = Countersigner(Ed25519PrivateKey.generate(), tmp_path / "receipts", "run")
    line = desk.countersign(1, dict(reply.content.config_records[LEDGER_KEY]), None, 0, broadcast.hash)
    assert line.entry == entry and desk.epsilon == {"h1": entry["epsilon"]}

    # Asked again for the same round's metrics on the same model: the same line, nothing spent.
    again = evaluate_global(_evaluate(tmp_path, tiny_base)[1], context)
    assert (
        again.content.config_records[LEDGER_KEY]["line"] == reply.content.config_records[LEDGER_KEY]["line"]
    )
    assert len(_ledger(tmp_path)) == 1


def test_the_estimate_is_close_to_the_exact_per_record_mean(tmp_path: Path, tiny_base: Path) -> None:
    """With the losses also shared (to check), the estimate lies within 4 stated noise stds."""
    privacy = PrivacyConfig(
        sample_rate=0.5,
        noise_multiplier=1.0,
        epsilon=50.0,
        rounds=2,
        metrics=MetricsPrivacyConfig(noise_multiplier=1.0),
    )
    context, message, _ = _evaluate(tmp_path, tiny_base, privacy=privacy, share=ShareConfig(loss=True))
    reply = evaluate_global(message, context)
    exact = reply.content.metric_records[METRICS_KEY]["record_val_loss"]
    entry = _ledger(tmp_path)[0]
    found = estimate(Released.from_json(entry["metrics"]), entry["sigma"])
    assert isinstance(exact, float) and 0 < exact < 16
    assert abs(found.loss - exact) < 4 * found.loss_std
    assert found.loss_std < 1.0  # 30 validation records, radius 8, z 1


def test_no_window_or_metrics_disabled_releases_nothing(tmp_path: Path, tiny_base: Path) -> None:
    context, message, _ = _evaluate(tmp_path / "a", tiny_base, extra=None)
    assert LEDGER_KEY not in evaluate_global(message, context).content.config_records
    off = PrivacyConfig(sample_rate=0.5, noise_multiplier=1.0, metrics=MetricsPrivacyConfig(enabled=False))
    context, message, _ = _evaluate(tmp_path / "b", tiny_base, privacy=off)
    assert LEDGER_KEY not in evaluate_global(message, context).content.config_records
    assert _ledger(tmp_path / "a") == [] and _ledger(tmp_path / "b") == []


def test_a_release_past_the_budget_is_declined_and_spends_nothing(tmp_path: Path, tiny_base: Path) -> None:
    """Training took epsilon to 1.355; one more release (z = 12) would take it to 1.389."""
    tight = PrivacyConfig(
        sample_rate=0.5,
        noise_multiplier=2.0,
        epsilon=1.37,
        rounds=1,
        metrics=MetricsPrivacyConfig(noise_multiplier=12.0),
    )
    context = site_context(tmp_path, NOTES, tight, base=tiny_base)
    train(train_message(tiny_base, TRAIN)[0], context)
    message, _ = train_message(tiny_base, TRAIN, extra=WINDOW, message_type=MessageType.EVALUATE)
    ledger = evaluate_global(message, context).content.config_records[LEDGER_KEY]
    assert "releasing the metrics would take epsilon" in str(ledger["declined"])
    assert "past the site's budget of 1.37" in str(ledger["declined"])
    assert [entry["release"] for entry in _ledger(tmp_path)] == ["update"]


def test_metrics_that_alone_would_take_half_the_budget_are_not_released(
    tmp_path: Path, tiny_base: Path
) -> None:
    small = PrivacyConfig(sample_rate=0.5, noise_multiplier=1.0, epsilon=0.5)  # one release alone: 0.73
    context, message, _ = _evaluate(tmp_path, tiny_base, privacy=small)
    assert LEDGER_KEY not in evaluate_global(message, context).content.config_records
    assert _ledger(tmp_path) == []


def test_a_window_the_site_cannot_use_is_refused(tmp_path: Path, tiny_base: Path) -> None:
    bad = {CENTRE_KEY: [8.0, 4.0], RADIUS_KEY: [0.0, 4.0]}
    context, message, _ = _evaluate(tmp_path, tiny_base, extra=bad)
    with pytest.raises(PayloadError, match="radii in"):
        evaluate_global(message, context)
    assert _ledger(tmp_path) == []


def test_a_validation_split_one_record_could_reshape_releases_nothing(
    tmp_path: Path, tiny_base: Path
) -> None:
    """Attack on the neighbouring relation: where no record falls into validation by its hash,
    one is moved there, and adding a record would move it back (a replacement, sensitivity
    above 1). Such a site releases no metrics."""
    notes = next(
        batch
        for batch in ([f"note {i}-{j}: stable" for j in range(4)] for i in range(1000))
        if split_records(batch, 0.1, 0).forced_val
    )
    context = site_context(tmp_path, notes, PRIVACY, base=tiny_base)
    message, _ = train_message(
        tiny_base, TRAIN, server_round=0, extra=WINDOW, message_type=MessageType.EVALUATE
    )
    assert LEDGER_KEY not in evaluate_global(message, context).content.config_records
    assert _ledger(tmp_path) == []
