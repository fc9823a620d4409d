"""A round at a site, as steps: receive the model, train or evaluate, compress, reply.

The ClientApp's handlers (`app.py`) call `receive`, then `train_without_dp`, `train_with_dp`
(`private_round.py`) or `evaluate_round` (`evaluation.py`). The round's settings are read once
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
from fedglm.clients.sync import check_base, parse_mask, prune_held, receive_model
from fedglm.compression import CODECS, NO_HASH, Header, Kind
from fedglm.config import SiteSpec, TrainConfig
from fedglm.data import SiteData, sample_batches
from fedglm.errors import InputError
from fedglm.models.base import BaseModel
from fedglm.models.lora import LoraSpec, is_trained_adapter, load_wire_state, wire_state
from fedglm.models.tokenizer import encode_records
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
from fedglm.privacy.ledger import LedgerLine
from fedglm.privacy.site import (
    keep_receipt,
)
from fedglm.protocol import RoundConfig
from fedglm.training import (
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
    model: torch.nn.Module
    device: torch.device
    data: SiteData
    held: HeldModel | None
    lora: LoraSpec | None
    base: BaseModel

    def records(self, texts: list[str]) -> list[list[int]]:
        """`texts` as token ids of the base's tokenizer, each framed by BOS and EOS."""
        return encode_records(self.base.tokenizer(), texts)


def receive(site: SiteSpec, message: Message) -> Received:
    """Read the round's settings and bring the site's model up to date from the message."""
    raw = message.content.config_records.get(CONFIG_KEY)
    config = RoundConfig.from_record(raw)
    assert raw is not None
    if site.base is None:
        raise InputError(f"site {site.name}: no base model folder (base:) in its config")
    base = BaseModel.open(site.base)
    check_base(base, config.base_hash)
    lora = config.train.lora_spec(config.model.init_seed, base.family)
    base.check_lora(lora)
    if config.train.seq_len > base.max_positions:
        raise PayloadError(
            f"train.seq_len {config.train.seq_len} exceeds the base model's {base.max_positions} positions",
            "bad-config",
        )
    mask = parse_mask(config.mask, base.shape)
    check_model_fits(base.parameters, base.trained(lora), _per_sample_rows(site, config.train))
    model = base.empty(lora=lora, mask=mask)
    held = _sync(site, message, config, model, base, lora)
    device = _device()
    return Received(site, config, raw, model.to(device), device, load_site_data(site), held, lora, base)


def _sync(
    site: SiteSpec,
    message: Message,
    config: RoundConfig,
    model: torch.nn.Module,
    base: BaseModel,
    lora: LoraSpec | None,
) -> HeldModel | None:
    """Load the message's model into `model`: dense weights as they are, or the site's held copy
    moved by the payload (kept on disk for the next round)."""
    blob = read_payload(message.content)
    shapes = expected_shapes(model)
    if blob is None:
        state = read_state(message.content, shapes)
        check_weights(state)
        load_wire_state(model, state)
        return None
    if config.run_key is None:
        raise PayloadError("config 'run-key' is missing, expected a string")
    folder = state_dir(site)
    loaded = load_held(folder, config.run_key)
    previous = prune_held(loaded, config.mask, base) if loaded is not None else None
    held = receive_model(
        blob, held=previous, run=config.run_key, base=base, shapes=shapes, mask_text=config.mask, lora=lora
    )
    if held is not loaded:
        save_held(folder, held)
    load_wire_state(model, held.state)
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
    records = received.records(received.data.train)
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
    trained = wire_state(received.model)
    # With LoRA only B trains (A is frozen and the same everywhere), and only B is sent.
    sent = (
        held.state
        if received.lora is None
        else {n: t for n, t in held.state.items() if is_trained_adapter(n)}
    )
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
