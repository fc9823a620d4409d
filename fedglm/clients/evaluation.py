"""An evaluation round at a site: the model's validation loss, exact or released under DP.

The site scores the model it received on its validation records, record by record. What it
sends back: the exact loss and bits per byte only if it declared them public (`share.loss`:
token-weighted, `val_loss` and `val_bpb`, and per-record means, `record_val_loss` and
`record_val_bpb`); and, when the coordinator names a window for the metrics (`metrics.centre`,
`metrics.radius`) and the site has `privacy.metrics.enabled`, its mean validation loss and
bits per byte released through the Gaussian mechanism (`privacy/metric_release.py`), under
its privacy lock like a training round: keep the coordinator's receipts, plan the release
from the verified ledger (or decline it: the budget), noise the clipped per-record values,
append the signed line that holds them (fsynced), reply with that line. Asked again for the same
round's metrics on the same model (the coordinator resumed the round), the site sends the
line it holds, at no new cost; on another model it refuses.
"""

from __future__ import annotations

import math
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import log

from fedglm.clients.private_round import ledger_record, release_context
from fedglm.clients.round import Received, keep_receipts, receive
from fedglm.clients.site import public_metrics, state_dir
from fedglm.config import SiteSpec
from fedglm.data import text_bytes
from fedglm.errors import InputError
from fedglm.payload import LEDGER_KEY, METRICS_KEY
from fedglm.privacy.keys import load_private_key
from fedglm.privacy.metric_release import record_metrics, release
from fedglm.privacy.site import (
    Decline,
    ledger_lock,
    not_countersigned,
    open_ledger,
    plan_metric_release,
    planned_metric_releases,
    record_metric_release,
    released_before,
)
from fedglm.protocol import read_receipts
from fedglm.training import pooled, record_losses, resolve_precision


def evaluate_round(site: SiteSpec, message: Message) -> Message:
    received = receive(site, message)
    receipts = read_receipts(message.content)
    cfg = received.config.train
    precision = resolve_precision(cfg.precision, received.device)
    texts = received.data.val
    losses = record_losses(
        received.model,
        received.records(texts),
        seq_len=cfg.seq_len,
        batch_size=cfg.eval_batch_size,
        precision=precision,
        device=received.device,
    )
    exact = pooled(losses, text_bytes(texts))
    per_record = record_metrics(losses, [text_bytes([t]) for t in texts])
    means = [sum(column) / len(column) for column in zip(*per_record, strict=True)] or [math.nan] * 2
    metrics = public_metrics(
        site,
        len(texts),
        val_loss=exact.loss,
        val_bpb=exact.bits_per_byte,
        record_val_loss=means[0],
        record_val_bpb=means[1],
    )
    content = RecordDict({METRICS_KEY: metrics})
    if releases_metrics(received):
        content[LEDGER_KEY] = release_metrics(received, receipts, per_record, precision)
    elif receipts and site.privacy.enabled:
        with ledger_lock(state_dir(site)):
            _, lines = open_ledger(state_dir(site), load_private_key(site.signing_key()))
            keep_receipts(site, receipts, lines)
    return Message(content=content, reply_to=message)


def releases_metrics(received: Received) -> bool:
    """Whether this evaluation releases the site's metrics under DP: asked for, allowed, planned
    for in the budget (`privacy/site.py`), and on a validation split that one record cannot
    reshape (`data.SiteData.forced_val`)."""
    site, config = received.site, received.config
    if received.held is None or config.metrics_window is None:
        return False
    privacy = site.privacy
    if not (privacy.enabled and privacy.metrics.enabled):
        return False
    if not planned_metric_releases(privacy, privacy.rounds or config.rounds or 1):
        log(
            WARNING,
            "%s: the run's metric releases alone would take over half of epsilon %g; not released "
            "(raise privacy.metrics.noise_multiplier to release them)",
            site.name,
            privacy.epsilon,
        )
        return False
    if received.data.forced_val:
        log(WARNING, "%s: no record fell into validation by its hash; metrics not released", site.name)
        return False
    return True


def release_metrics(
    received: Received, receipts: list[str], per_record: list[tuple[float, float]], precision: str
) -> ConfigRecord:
    """The ledger record of this round's metric release (the module docstring's steps)."""
    site, held, window = received.site, received.held, received.config.metrics_window
    assert held is not None and window is not None
    folder = state_dir(site)
    key = load_private_key(site.signing_key())
    server_round = received.config.server_round or 0
    with ledger_lock(folder):
        ledger, lines = open_ledger(folder, key)
        keep_receipts(site, receipts, lines)
        again = released_before(lines, run=held.run, server_round=server_round, release="metrics")
        if again is not None:
            if again.entry["model_received"] != held.hash.hex():
                raise InputError(
                    f"the metrics of round {server_round} of run {held.run} are already in this site's "
                    f"ledger (entry {again.entry['sequence']}) for another model: a site never "
                    "releases a round's metrics twice"
                )
            sequence = int(again.entry["sequence"])
            log(
                INFO,
                "%s: round %d's metrics were released before; sending them again",
                site.name,
                server_round,
            )
            earlier = [x for x in not_countersigned(folder, lines) if int(x.entry["sequence"]) < sequence]
            return ledger_record(again, earlier, key)
        plan = plan_metric_release(site.privacy, lines)
        if isinstance(plan, Decline):
            reason = plan.reason(site.privacy.epsilon).replace("the round", "releasing the metrics")
            log(INFO, "%s: round %d %s", site.name, server_round, reason)
            return ConfigRecord({"declined": reason})
        released = release(per_record, window, plan.noise_multiplier)
        line = record_metric_release(
            ledger,
            lines,
            plan,
            released,
            site.privacy,
            key,
            count_public=site.share.record_count,
            release=release_context(received, precision),
        )
        return ledger_record(line, not_countersigned(folder, lines), key)
