"""A round at a site, as steps: receive the model, train or evaluate, compress, reply.

The ClientApp's handlers (`app.py`) call `receive`, then `train_without_dp`, `train_with_dp`
(`private_round.py`) or `evaluate_round`. The round's settings are read once
(`protocol.RoundConfig.from_record`); the site's copy of the global model is brought up to
date from the message's payload (`sync.py`), after the model's size is checked against this
machine from public values (`limits.py`).

With DP on (`privacy.enabled`, the default) a training round is `private_round.py`'s. Without
DP a round trains plainly; a site answers a plain FedAvg message (dense tensors, as Flower's
stock strategies send) with dense weights.

What leaves the site: the compressed update (error feedback: what is not sent now is kept in
the residual for later rounds), the signed ledger entry, and the metrics the site declared
public (`site.public_metrics`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from logging import WARNING

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import log

from fedglm import compression
from fedglm.clients.limits import check_model_fits, check_round_steps, check_weights
from fedglm.clients.site import load_site_data, public_metrics, state_dir
from fedglm.clients.state import HeldModel, load_held, load_residual, save_held, save_residual
from fedglm.clients.sync import check_pinned_base, parse_mask, prune_held, receive_model
from fedglm.compression import CODECS, NO_HASH, Header, Kind
from fedglm.config import SiteSpec, TrainConfig
from fedglm.data import SiteData, encode, sample_batches
from fedglm.lora import LoraSpec, adapter_state, add_adapters
from fedglm.model import GLM
from fedglm.payload import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    PayloadError,
    expected_shapes,
    payload_record,
    read_payload,
    read_state,
    state_record,
)
from fedglm.privacy.keys import load_private_key
from fedglm.privacy.ledger import LedgerLine
from fedglm.privacy.site import (
    keep_receipt,
    ledger_lock,
    open_ledger,
)
from fedglm.protocol import RoundConfig, read_receipts
from fedglm.training import (
    evaluate,
    optimizer_for,
    resolve_precision,
    steps_for,
    train_local,
)

Residual = dict[str, np.ndarray]


@dataclass(frozen=True)
class Received:
    """A message as a site works on it: the round's settings, its model on the device, the data.

    `held` is the site's copy of the global model (None for a plain FedAvg message); `raw` is
    the config record as it arrived (the ledger entry hashes it).
    """

    site: SiteSpec
    config: RoundConfig
    raw: ConfigRecord
    model: GLM
    device: torch.device
    data: SiteData
    held: HeldModel | None
    lora: LoraSpec | None


def evaluate_round(site: SiteSpec, message: Message) -> Message:
    received = receive(site, message)
    receipts = read_receipts(message.content)
    if receipts and site.privacy.enabled:
        with ledger_lock(state_dir(site)):
            _, lines = open_ledger(state_dir(site), load_private_key(site.signing_key()))
            keep_receipts(site, receipts, lines)
    cfg = received.config.train
    stats = evaluate(
        received.model,
        [encode(t) for t in received.data.val],
        seq_len=cfg.seq_len,
        batch_size=cfg.eval_batch_size,
        precision=resolve_precision(cfg.precision, received.device),
        device=received.device,
    )
    metrics = public_metrics(site, len(received.data.val), val_loss=stats.loss, val_bpb=stats.bits_per_byte)
    return Message(content=RecordDict({METRICS_KEY: metrics}), reply_to=message)


def receive(site: SiteSpec, message: Message) -> Received:
    """Read the round's settings and bring the site's model up to date from the message."""
    raw = message.content.config_records.get(CONFIG_KEY)
    config = RoundConfig.from_record(raw)
    assert raw is not None
    check_pinned_base(site.base_hash, config.base_hash)
    lora = config.train.lora_spec(config.model.init_seed)
    args = parse_mask(config.mask, config.model).shape(config.model.glm_args())
    check_model_fits(args, _per_sample_rows(site, config.train))  # before anything is allocated
    model = GLM(args)
    if lora is not None:
        add_adapters(model, lora)
    held = _sync(site, message, config, model, lora)
    device = _device()
    return Received(site, config, raw, model.to(device), device, load_site_data(site), held, lora)


def _sync(
    site: SiteSpec, message: Message, config: RoundConfig, model: GLM, lora: LoraSpec | None
) -> HeldModel | None:
    """Load the message's model into `model`: dense weights as they are, or the site's held copy
    moved by the payload (kept on disk for the next round)."""
    blob = read_payload(message.content)
    if blob is None:
        state = read_state(message.content, expected_shapes(model))
        check_weights(state)
        model.load_state_dict(state)
        return None
    if config.run_key is None:
        raise PayloadError("config 'run-key' is missing, expected a string")
    folder = state_dir(site)
    loaded = load_held(folder, config.run_key)
    previous = prune_held(loaded, config.mask, config.model) if loaded is not None else None
    held = receive_model(
        blob,
        held=previous,
        run=config.run_key,
        model_cfg=config.model,
        shapes=expected_shapes(model),
        mask_text=config.mask,
        lora=lora,
        base_hash=bytes.fromhex(config.base_hash) if config.base_hash else None,
    )
    if held is not loaded:
        save_held(folder, held)
    model.load_state_dict(held.state)
    return held


def _per_sample_rows(site: SiteSpec, cfg: TrainConfig) -> float:
    """Per-sample gradient rows a step holds, from public values only (`limits.py`)."""
    if not site.privacy.enabled or site.privacy.mode == "ghost":
        return 0.0
    return site.privacy.expected_batch_size or float(cfg.batch_size)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def keep_receipts(site: SiteSpec, receipts: list[str], lines: list[LedgerLine]) -> None:
    """Keep the coordinator's receipts for entries of this (verified) ledger."""
    kept = [keep_receipt(state_dir(site), text, lines) for text in receipts]
    if not all(kept):
        log(WARNING, "%s: the coordinator sent a receipt for no entry of this ledger; ignored", site.name)


def train_without_dp(received: Received, message: Message) -> Message:
    site, config, cfg = received.site, received.config, received.config.train
    records = [encode(t) for t in received.data.train]
    server_round = config.server_round or 0
    generator = torch.Generator().manual_seed(_round_seed(config.seed, site.name, server_round))
    steps = steps_for(cfg.local_steps, cfg.local_epochs, len(records), cfg.batch_size)
    check_round_steps(steps)
    stats = train_local(
        received.model,
        sample_batches(records, batch_size=cfg.batch_size, seq_len=cfg.seq_len, generator=generator),
        optimizer=optimizer_for(received.model, cfg),
        steps=steps,
        precision=resolve_precision(cfg.precision, received.device),
        grad_clip=cfg.grad_clip,
        device=received.device,
    )
    metrics = public_metrics(site, len(records), train_loss=stats.loss)
    if received.held is None:
        arrays = state_record(received.model)
    else:
        blob, residual = compress_update(received, server_round)
        save_residual(state_dir(site), received.held.run, residual)
        arrays = payload_record(blob)
    return Message(content=RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: metrics}), reply_to=message)


def _round_seed(seed: int, site: str, server_round: int) -> int:
    digest = hashlib.sha256(f"{seed}/{site}/{server_round}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


def compress_update(received: Received, server_round: int) -> tuple[bytes, Residual]:
    """The trained model's change plus the residual, compressed; and the new residual (what was
    not sent), which the caller saves before anything leaves."""
    held, uplink = received.held, received.config.uplink
    assert held is not None
    if uplink is None:
        raise PayloadError("config 'uplink.codec' is missing: the coordinator sent no uplink settings")
    trained = received.model.state_dict()
    # With LoRA only the adapters train, and only they are sent; the base never leaves.
    sent = held.state if received.lora is None else adapter_state(held.state)
    change = {
        name: (trained[name].detach().float().cpu() - base).reshape(-1).numpy() for name, base in sent.items()
    }
    shapes = {name: tuple(t.shape) for name, t in sent.items()}
    previous = load_residual(state_dir(received.site), held.run, shapes)
    if previous is not None:
        for name, array in change.items():
            array += previous[name]
    header = Header(Kind.UPDATE, CODECS[uplink.codec].codec_id, server_round, held.hash, NO_HASH)
    # The encoder leaves in each array what it did not send: that is the new residual.
    blob = compression.encode(
        change, shapes, CODECS[uplink.codec], header, density=uplink.density, selection=uplink.selection
    )
    residual = change
    return blob, residual
