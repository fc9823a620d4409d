"""The fedglm ClientApp: runs inside Flower's `flwr-clientapp` process at a hospital.

`fedglm client` writes the site's spec (`site-spec.json`: name, data, what it shares, where its
state lives) and hands its path to the SuperNode as the node config value `fedglm-site`. For
each message the app reads the site's records (they never leave this process), brings its copy
of the global model up to date from the message's payload (`clients/sync.py`), trains or
evaluates, and replies with only a compressed update (error feedback: what is not sent now is
kept in `residual.pt` for later rounds) and the metrics the site declared public.

With DP on (`privacy.enabled`, the default) training is DP-SGD (`privacy/dpsgd.py`) within the
site's budget, in this order: plan the round from the verified ledger (or decline it), train,
compress, append the signed ledger entry (fsynced), save the residual, reply with the payload
and the entry. A receipt from the coordinator, sent with a later message, is kept beside the
ledger (`privacy/site.py`).

A message with plain fp32 tensors instead of a payload (Flower's stock FedAvg, as in the
benchmarks) is answered in kind, with the trained weights as dense fp32 tensors, by sites
without DP only.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from fedglm import compression
from fedglm.clients.limits import check_model_fits, check_round_steps, check_weights
from fedglm.clients.state import HeldModel, load_held, load_residual, save_held, save_residual
from fedglm.clients.sync import check_pinned_base, parse_mask, prune_held, receive_model
from fedglm.compression import CODECS, NO_HASH, Header, Kind
from fedglm.config import LinkConfig, ModelConfig, SiteSpec, TrainConfig, validate_config
from fedglm.data import SiteData, encode, load_records, sample_batches, split_records
from fedglm.errors import InputError
from fedglm.lora import LoraSpec, adapter_state, add_adapters
from fedglm.model import GLM
from fedglm.payload import (
    ARRAYS_KEY,
    BASE_HASH_KEY,
    CONFIG_KEY,
    LEDGER_KEY,
    METRICS_KEY,
    RECEIPT_KEY,
    PayloadError,
    expected_shapes,
    payload_record,
    read_payload,
    read_state,
    split_round_config,
    state_record,
)
from fedglm.privacy.dpsgd import check_precision, dp_precision, train_private
from fedglm.privacy.keys import load_private_key, public_pem
from fedglm.privacy.ledger import LedgerLine
from fedglm.privacy.site import (
    MAX_CATCH_UP,
    Decline,
    check_delta,
    config_hash,
    expected_batch,
    keep_receipt,
    keep_sent,
    ledger_lock,
    not_countersigned,
    open_ledger,
    plan_round,
    privacy_dir,
    record_round,
    released_before,
    round_steps,
    sample_rate,
    sent_update,
)
from fedglm.pruning import MASK_KEY
from fedglm.training import evaluate, make_optimizer, resolve_precision, steps_for, train_local

SITE_KEY = "fedglm-site"
SITE_NAME = "site-spec.json"
_HEX64 = re.compile(r"[0-9a-f]{64}")

app = ClientApp()


def read_site(context: Context) -> SiteSpec:
    path = context.node_config.get(SITE_KEY)
    if not isinstance(path, str):
        raise InputError(f"node config has no '{SITE_KEY}': start SuperNodes with `fedglm client`")
    return SiteSpec.model_validate_json(Path(path).read_text(encoding="utf-8"))


def load_site_data(site: SiteSpec) -> SiteData:
    records = load_records(site.data.path, site.data.format, site.data.field)
    return split_records(records, site.data.val_fraction, site.data.split_seed)


def describe_site_data(site: SiteSpec) -> str:
    """Read and split the site's records as training will, check privacy.delta against them
    (with the count: this runs before the site connects, not in the ClientApp), and say what
    was found."""
    data = load_site_data(site)
    if site.privacy.enabled:
        check_delta(site.privacy, len(data.train), private=False)
    return (
        f"{site.name}: {len(data.train) + len(data.val)} records in {site.data.path} "
        f"({len(data.train)} train, {len(data.val)} validation)"
    )


def _round_settings(message: Message) -> tuple[ConfigRecord, ModelConfig, TrainConfig, int]:
    config = message.content.config_records.get(CONFIG_KEY)
    if config is None:
        raise PayloadError(f"no '{CONFIG_KEY}' ConfigRecord in the message")
    model_section, train_section, seed = split_round_config(config)
    source = "round config from the coordinator"
    model_cfg = validate_config(model_section, ModelConfig, source=source)
    train_cfg = validate_config(train_section, TrainConfig, source=source)
    return config, model_cfg, train_cfg, seed


def _state_dir(site: SiteSpec) -> Path:
    if site.state_dir is None:
        raise InputError(f"site {site.name} has no state_dir: start SuperNodes with `fedglm client`")
    return site.state_dir


def _config_str(config: ConfigRecord, key: str) -> str:
    value = config.get(key)
    if not isinstance(value, str):
        raise PayloadError(f"config '{key}' is {value!r}, expected a string")
    return value


def _public_metrics(site: SiteSpec, n_records: int, **losses: float) -> MetricRecord:
    metrics = MetricRecord({"weight": float(n_records) if site.share.record_count else 1.0})
    metrics["records-public"] = int(site.share.record_count)
    if site.share.loss:
        for key, value in losses.items():
            metrics[key] = value
    return metrics


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _round_seed(seed: int, site: str, server_round: int) -> int:
    digest = hashlib.sha256(f"{seed}/{site}/{server_round}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class Task:
    """What both handlers start from: the site, the round's model on its device, the data.

    `held` is the site's copy of the global model (None for a plain FedAvg message).
    """

    site: SiteSpec
    config: ConfigRecord
    model: GLM
    cfg: TrainConfig
    seed: int
    device: torch.device
    data: SiteData
    held: HeldModel | None
    lora: LoraSpec | None = None


def _task(message: Message, context: Context) -> Task:
    site = read_site(context)
    config, model_cfg, train_cfg, seed = _round_settings(message)
    mask_text = config.get(MASK_KEY, "")
    if not isinstance(mask_text, str):
        raise PayloadError(
            f"config '{MASK_KEY}' is {type(mask_text).__name__}, expected a string", "bad-mask"
        )
    announced = config.get(BASE_HASH_KEY)
    if announced is not None and not (isinstance(announced, str) and _HEX64.fullmatch(announced)):
        raise PayloadError(f"config '{BASE_HASH_KEY}' is {announced!r}, expected 64 hex digits", "wrong-base")
    check_pinned_base(site.base_hash, announced)
    lora = train_cfg.lora_spec(model_cfg.init_seed)
    args = parse_mask(mask_text, model_cfg).shape(model_cfg.glm_args())
    check_model_fits(args, _per_sample_rows(site, train_cfg))  # before anything is allocated
    model = GLM(args)
    if lora is not None:
        add_adapters(model, lora)
    blob = read_payload(message.content)
    held = None
    if blob is None:
        state = read_state(message.content, expected_shapes(model))
        check_weights(state)
        model.load_state_dict(state)
    else:
        state_dir = _state_dir(site)
        run = _config_str(config, "run-key")
        loaded = load_held(state_dir, run)
        previous = prune_held(loaded, mask_text, model_cfg) if loaded is not None else None
        held = receive_model(
            blob,
            held=previous,
            run=run,
            model_cfg=model_cfg,
            shapes=expected_shapes(model),
            mask_text=mask_text,
            lora=lora,
            base_hash=bytes.fromhex(announced) if announced else None,
        )
        if held is not loaded:
            save_held(state_dir, held)
        model.load_state_dict(held.state)
    receipt = message.content.config_records.get(RECEIPT_KEY)
    if receipt is not None and site.privacy.enabled:
        _keep_receipt(site, receipt)
    device = _device()
    return Task(site, config, model.to(device), train_cfg, seed, device, load_site_data(site), held, lora)


def _per_sample_rows(site: SiteSpec, cfg: TrainConfig) -> float:
    """Per-sample gradient rows a step holds, from public values only (`limits.py`)."""
    if not site.privacy.enabled or site.privacy.mode == "ghost":
        return 0.0
    return site.privacy.expected_batch_size or float(cfg.batch_size)


def _keep_receipt(site: SiteSpec, receipt: ConfigRecord) -> None:
    received = receipt.get("lines")
    state_dir = _state_dir(site)
    key = load_private_key(site.signing_key())
    _, lines = open_ledger(state_dir, key)
    texts = received if isinstance(received, list) else []
    kept = [keep_receipt(state_dir, text, lines) for text in texts[:MAX_CATCH_UP] if isinstance(text, str)]
    if not kept or not all(kept):
        log(WARNING, "%s: the coordinator sent a receipt for no entry of this ledger; ignored", site.name)


def _compressed_update(task: Task, server_round: int) -> tuple[bytes, dict[str, np.ndarray]]:
    """The trained model's change plus the residual, compressed; and the new residual (the
    caller saves it before anything leaves)."""
    assert task.held is not None
    uplink = validate_config(
        {key: task.config.get(f"uplink.{key}") for key in ("codec", "density", "selection")},
        LinkConfig,
        source="round config from the coordinator",
    )
    trained = task.model.state_dict()
    # With LoRA only the adapters train, and only they are sent; the base never leaves.
    sent = task.held.state if task.lora is None else adapter_state(task.held.state)
    values = {
        name: (trained[name].detach().float().cpu() - base).reshape(-1).numpy() for name, base in sent.items()
    }
    shapes = {name: tuple(t.shape) for name, t in sent.items()}
    state_dir, run = _state_dir(task.site), task.held.run
    residual = load_residual(state_dir, run, shapes)
    if residual is not None:
        for name, array in values.items():
            array += residual[name]
    codec = CODECS[uplink.codec]
    header = Header(Kind.UPDATE, codec.codec_id, server_round, task.held.hash, NO_HASH)
    blob = compression.encode(
        values, shapes, codec, header, density=uplink.density, selection=uplink.selection
    )
    return blob, values


def _train_private(task: Task, message: Message, records: list[list[int]], server_round: int) -> Message:
    """DP-SGD for one round, within the site's budget; the ledger entry is on disk before the
    update leaves (see `fedglm/privacy/site.py` for the order)."""
    site = task.site
    if task.held is None:
        raise InputError(
            f"site {site.name} trains with DP and keeps a ledger: it answers fedglm's compressed "
            "messages only, not plain FedAvg"
        )
    state_dir = _state_dir(site)
    key = load_private_key(site.signing_key())
    with ledger_lock(state_dir):  # from planning until the entry is on disk
        return _train_private_locked(task, message, records, server_round, key)


def _train_private_locked(
    task: Task, message: Message, records: list[list[int]], server_round: int, key: Ed25519PrivateKey
) -> Message:
    site, privacy, cfg, held = task.site, task.site.privacy, task.cfg, task.held
    assert held is not None
    state_dir = _state_dir(site)
    ledger, lines = open_ledger(state_dir, key)
    again = released_before(lines, run=held.run, server_round=server_round)
    if again is not None:
        return _send_again(task, message, again, lines, key)
    count_public = site.share.record_count
    q = sample_rate(privacy, batch_size=cfg.batch_size, n_train=len(records))
    steps = round_steps(cfg.local_steps, cfg.local_epochs, q)
    check_round_steps(steps)
    planned = privacy.rounds or int(task.config.get("rounds", 1))
    plan = plan_round(
        privacy,
        lines,
        q=q,
        steps=steps,
        planned_rounds=planned,
        n_train=len(records),
        expected_batch=expected_batch(
            privacy, q=q, n_train=len(records), count_public=count_public, batch_size=cfg.batch_size
        ),
        cache_dir=privacy_dir(state_dir),
    )
    if isinstance(plan, Decline):
        reason = plan.reason(privacy.epsilon)
        log(INFO, "%s: round %d %s", site.name, server_round, reason)
        content = RecordDict(
            {
                METRICS_KEY: MetricRecord({"declined": 1, "epsilon": plan.epsilon}),
                LEDGER_KEY: ConfigRecord({"declined": reason}),
            }
        )
        return Message(content=content, reply_to=message)
    precision = dp_precision(cfg.precision, resolve_precision(cfg.precision, task.device), privacy.mode)
    refused = check_precision(privacy.mode, precision)
    if refused is not None:
        raise InputError(refused)
    stats = train_private(
        task.model,
        records,
        optimizer=make_optimizer(
            task.model, name=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        ),
        q=plan.q,
        sigma=plan.sigma,
        clip_norm=privacy.clip_norm,
        steps=plan.steps,
        seq_len=cfg.seq_len,
        precision=precision,
        mode=privacy.mode,
        device=task.device,
        expected_batch_size=plan.expected_batch,
    )
    blob, residual = _compressed_update(task, server_round)
    keep_sent(state_dir, blob)
    line = record_round(
        ledger,
        lines,
        plan,
        privacy,
        key,
        count_public=count_public,
        client=site.name,
        run=held.run,
        server_round=server_round,
        precision=precision,
        model_received=held.hash.hex(),
        update_sent=hashlib.sha256(blob).hexdigest(),
        config_digest=config_hash(
            privacy.model_dump(mode="json", exclude={"signing_key"}), dict(task.config)
        ),
    )
    save_residual(state_dir, held.run, residual)
    metrics = _public_metrics(site, len(records), train_loss=stats.loss)
    return _update_reply(message, blob, line, not_countersigned(state_dir, lines), key, metrics)


def _send_again(
    task: Task, message: Message, line: LedgerLine, lines: list[LedgerLine], key: Ed25519PrivateKey
) -> Message:
    """The round was trained and recorded before (see `privacy/site.py`): the same update again."""
    assert task.held is not None
    state_dir, sequence = _state_dir(task.site), int(line.entry["sequence"])
    blob, problem = sent_update(state_dir, line), ""
    if sequence != int(lines[-1].entry["sequence"]):
        problem = "a later round followed it"
    elif line.entry["model_received"] != task.held.hash.hex():
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
        task.site.name,
        int(line.entry["round"]),
        sequence,
    )
    earlier = [x for x in not_countersigned(state_dir, lines) if x is not line]
    return _update_reply(message, blob, line, earlier, key, _public_metrics(task.site, len(task.data.train)))


def _update_reply(
    message: Message,
    blob: bytes,
    line: LedgerLine,
    earlier: list[LedgerLine],
    key: Ed25519PrivateKey,
    metrics: MetricRecord,
) -> Message:
    ledger_record = ConfigRecord(
        {
            "line": json.dumps(line.as_json()),
            "public-key": public_pem(key.public_key()),
            "earlier": [json.dumps(x.as_json()) for x in earlier[-(MAX_CATCH_UP - 1) :]],
        }
    )
    content = RecordDict({ARRAYS_KEY: payload_record(blob), METRICS_KEY: metrics, LEDGER_KEY: ledger_record})
    return Message(content=content, reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    task = _task(message, context)
    cfg = task.cfg
    records = [encode(t) for t in task.data.train]
    server_round = int(task.config.get("server-round", 0))
    if task.site.privacy.enabled:
        return _train_private(task, message, records, server_round)
    generator = torch.Generator().manual_seed(_round_seed(task.seed, task.site.name, server_round))
    optimizer = make_optimizer(
        task.model, name=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    steps = steps_for(cfg.local_steps, cfg.local_epochs, len(records), cfg.batch_size)
    check_round_steps(steps)
    stats = train_local(
        task.model,
        sample_batches(records, batch_size=cfg.batch_size, seq_len=cfg.seq_len, generator=generator),
        optimizer=optimizer,
        steps=steps,
        precision=resolve_precision(cfg.precision, task.device),
        grad_clip=cfg.grad_clip,
        device=task.device,
    )
    metrics = _public_metrics(task.site, len(records), train_loss=stats.loss)
    if task.held is None:
        arrays = state_record(task.model)
    else:
        blob, residual = _compressed_update(task, server_round)
        save_residual(_state_dir(task.site), task.held.run, residual)
        arrays = payload_record(blob)
    return Message(content=RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: metrics}), reply_to=message)


@app.evaluate()
def evaluate_global(message: Message, context: Context) -> Message:
    task = _task(message, context)
    stats = evaluate(
        task.model,
        [encode(t) for t in task.data.val],
        seq_len=task.cfg.seq_len,
        batch_size=task.cfg.eval_batch_size,
        precision=resolve_precision(task.cfg.precision, task.device),
        device=task.device,
    )
    metrics = _public_metrics(task.site, len(task.data.val), val_loss=stats.loss, val_bpb=stats.bits_per_byte)
    return Message(content=RecordDict({METRICS_KEY: metrics}), reply_to=message)
