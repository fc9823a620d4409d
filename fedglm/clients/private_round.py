"""A training round at a site with DP on: plan, train, compress, record, reply.

It runs under the site's privacy lock, with the ledger opened and verified once: keep the
coordinator's receipts, plan the round from the ledger (or decline it, or send a round recorded
before again), train with DP-SGD, compress, keep the update, append the signed entry
(fsynced), save the residual, reply with the payload and the entry (`privacy/site.py` has the
order and why).
"""

from __future__ import annotations

import hashlib
import json
from logging import INFO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log

from fedglm.clients.limits import check_round_steps
from fedglm.clients.round import Received, compress_update, keep_receipts
from fedglm.clients.site import public_metrics, state_dir
from fedglm.clients.state import save_residual
from fedglm.errors import InputError
from fedglm.payload import ARRAYS_KEY, LEDGER_KEY, METRICS_KEY, payload_record
from fedglm.privacy.dpsgd import dp_precision_for, train_private
from fedglm.privacy.keys import load_private_key, public_pem
from fedglm.privacy.ledger import LedgerLine, release_of
from fedglm.privacy.site import (
    Decline,
    ReleaseContext,
    RoundPlan,
    config_hash,
    expected_batch,
    keep_sent,
    ledger_lock,
    not_countersigned,
    open_ledger,
    plan_round,
    privacy_dir,
    record_round,
    released_before,
    sample_rate,
    sent_update,
)
from fedglm.protocol import MAX_CATCH_UP, read_receipts
from fedglm.training import optimizer_for, private_steps_for


def train_with_dp(received: Received, message: Message) -> Message:
    """DP-SGD for one round, within the site's budget, under its privacy lock (the ledger is
    opened and verified once, and the entry is on disk before the update leaves)."""
    site = received.site
    if received.held is None:
        raise InputError(
            f"site {site.name} trains with DP and keeps a ledger: it answers fedglm's compressed "
            "messages only, not plain FedAvg"
        )
    folder = state_dir(site)
    key = load_private_key(site.signing_key())
    with ledger_lock(folder):
        ledger, lines = open_ledger(folder, key)
        keep_receipts(site, read_receipts(message.content), lines)
        server_round = received.config.server_round or 0
        again = released_before(lines, run=received.held.run, server_round=server_round)
        if again is not None:
            return send_again(received, message, again, lines, key)
        records = received.records(received.data.train)
        plan = plan_private_round(received, lines, len(records))
        if isinstance(plan, Decline):
            return decline(received, message, plan)
        precision = dp_precision_for(received.config.train.precision, received.device, site.privacy.mode)
        stats = train_private(
            received.model,
            records,
            optimizer=optimizer_for(received.model, received.config.train),
            q=plan.q,
            sigma=plan.sigma,
            clip_norm=site.privacy.clip_norm,
            steps=plan.steps,
            seq_len=received.config.train.seq_len,
            precision=precision,
            mode=site.privacy.mode,
            device=received.device,
            expected_batch_size=plan.expected_batch,
        )
        blob, residual = compress_update(received, server_round)
        keep_sent(folder, blob)
        line = record_round(
            ledger,
            lines,
            plan,
            site.privacy,
            key,
            count_public=site.share.record_count,
            release=release_context(received, precision),
            update_sent=hashlib.sha256(blob).hexdigest(),
        )
        save_residual(folder, received.held.run, residual)
        metrics = public_metrics(site, len(records), train_loss=stats.loss)
        return update_reply(message, blob, line, not_countersigned(folder, lines), key, metrics)


def release_context(received: Received, precision: str) -> ReleaseContext:
    """What the round's ledger lines name besides the mechanism (`privacy/site.py`)."""
    assert received.held is not None
    site = received.site
    return ReleaseContext(
        client=site.name,
        run=received.held.run,
        server_round=received.config.server_round or 0,
        precision=precision,
        model_received=received.held.hash.hex(),
        config_digest=config_hash(
            site.privacy.model_dump(mode="json", exclude={"signing_key"}), dict(received.raw)
        ),
    )


def plan_private_round(received: Received, lines: list[LedgerLine], n_train: int) -> RoundPlan | Decline:
    """The round's q, sigma and steps within the budget, from the verified ledger (`privacy/site.py`)."""
    site, cfg = received.site, received.config.train
    privacy = site.privacy
    q = sample_rate(privacy, batch_size=cfg.batch_size, n_train=n_train)
    steps = private_steps_for(cfg.local_steps, cfg.local_epochs, q)
    check_round_steps(steps)
    return plan_round(
        privacy,
        lines,
        q=q,
        steps=steps,
        planned_rounds=privacy.rounds or received.config.rounds or 1,
        n_train=n_train,
        expected_batch=expected_batch(
            privacy, q=q, n_train=n_train, count_public=site.share.record_count, batch_size=cfg.batch_size
        ),
        cache_dir=privacy_dir(state_dir(site)),
        metrics_asked=received.config.metrics_window is not None,
    )


def decline(received: Received, message: Message, plan: Decline) -> Message:
    """The round would pass the budget: say so, spend nothing."""
    reason = plan.reason(received.site.privacy.epsilon)
    log(INFO, "%s: round %d %s", received.site.name, received.config.server_round or 0, reason)
    content = RecordDict(
        {
            METRICS_KEY: MetricRecord({"declined": 1, "epsilon": plan.epsilon}),
            LEDGER_KEY: ConfigRecord({"declined": reason}),
        }
    )
    return Message(content=content, reply_to=message)


def send_again(
    received: Received, message: Message, line: LedgerLine, lines: list[LedgerLine], key: Ed25519PrivateKey
) -> Message:
    """The round was trained and recorded before (see `privacy/site.py`): the same update again."""
    assert received.held is not None
    folder, sequence = state_dir(received.site), int(line.entry["sequence"])
    blob, problem = sent_update(folder, line), ""
    if any(release_of(x.entry) == "update" for x in lines[sequence + 1 :]):
        problem = "a later round followed it"
    elif line.entry["model_received"] != received.held.hash.hex():
        problem = "the coordinator now sends another model"
    elif blob is None:
        problem = "its update is no longer kept"
    if blob is None or problem:
        raise InputError(
            f"round {line.entry['round']} of run {line.entry['run']} is already in this site's ledger "
            f"(entry {sequence}) and {problem}: a site never trains a round twice"
        )
    log(
        INFO,
        "%s: round %d was recorded before (entry %d); sending its update again",
        received.site.name,
        int(line.entry["round"]),
        sequence,
    )
    earlier = [x for x in not_countersigned(folder, lines) if int(x.entry["sequence"]) < sequence]
    metrics = public_metrics(received.site, len(received.data.train))
    return update_reply(message, blob, line, earlier, key, metrics)


def update_reply(
    message: Message,
    blob: bytes,
    line: LedgerLine,
    earlier: list[LedgerLine],
    key: Ed25519PrivateKey,
    metrics: MetricRecord,
) -> Message:
    content = RecordDict(
        {
            ARRAYS_KEY: payload_record(blob),
            METRICS_KEY: metrics,
            LEDGER_KEY: ledger_record(line, earlier, key),
        }
    )
    return Message(content=content, reply_to=message)


def ledger_record(line: LedgerLine, earlier: list[LedgerLine], key: Ed25519PrivateKey) -> ConfigRecord:
    """A release's ledger line, the lines before it not yet countersigned, and the site's key."""
    return ConfigRecord(
        {
            "line": json.dumps(line.as_json()),
            "public-key": public_pem(key.public_key()),
            "earlier": [json.dumps(x.as_json()) for x in earlier[-(MAX_CATCH_UP - 1) :]],
        }
    )
