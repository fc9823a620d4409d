"""The fedglm ClientApp: runs inside Flower's `flwr-clientapp` process at a hospital.

`fedglm client` writes the site's spec (`site-spec.json`: name, data, what it shares) and hands
its path to the SuperNode as the node config value `fedglm-site`. For each message the app
reads the site's records (they never leave this process), checks the model it was sent, trains
or evaluates, and replies with the weights and only the metrics the site declared public.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedglm.config import ModelConfig, SiteSpec, TrainConfig, validate_config
from fedglm.data import SiteData, encode, load_records, sample_batches, split_records
from fedglm.errors import InputError
from fedglm.model import GLM
from fedglm.payload import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    PayloadError,
    expected_shapes,
    read_state,
    split_round_config,
    state_record,
)
from fedglm.training import evaluate, make_optimizer, resolve_precision, steps_for, train_local

SITE_KEY = "fedglm-site"
SITE_NAME = "site-spec.json"

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
    """Read and split the site's records as training will, and say what was found."""
    data = load_site_data(site)
    return (
        f"{site.name}: {len(data.train) + len(data.val)} records in {site.data.path} "
        f"({len(data.train)} train, {len(data.val)} validation)"
    )


def _received_model(message: Message) -> tuple[GLM, TrainConfig, int]:
    config = message.content.config_records.get(CONFIG_KEY)
    if config is None:
        raise PayloadError(f"no '{CONFIG_KEY}' ConfigRecord in the message")
    model_section, train_section, seed = split_round_config(config)
    source = "round config from the coordinator"
    model_cfg = validate_config(model_section, ModelConfig, source=source)
    train_cfg = validate_config(train_section, TrainConfig, source=source)
    model = GLM(model_cfg.glm_args())
    model.load_state_dict(read_state(message.content, expected_shapes(model)))
    return model, train_cfg, seed


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
    """What both handlers start from: the site, the received model on its device, the data."""

    site: SiteSpec
    model: GLM
    cfg: TrainConfig
    seed: int
    device: torch.device
    data: SiteData


def _task(message: Message, context: Context) -> Task:
    site = read_site(context)
    model, cfg, seed = _received_model(message)
    device = _device()
    return Task(site, model.to(device), cfg, seed, device, load_site_data(site))


@app.train()
def train(message: Message, context: Context) -> Message:
    task = _task(message, context)
    cfg = task.cfg
    records = [encode(t) for t in task.data.train]
    server_round = int(message.content.config_records[CONFIG_KEY].get("server-round", 0))
    generator = torch.Generator().manual_seed(_round_seed(task.seed, task.site.name, server_round))
    optimizer = make_optimizer(
        task.model, name=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    stats = train_local(
        task.model,
        sample_batches(records, batch_size=cfg.batch_size, seq_len=cfg.seq_len, generator=generator),
        optimizer=optimizer,
        steps=steps_for(cfg.local_steps, cfg.local_epochs, len(records), cfg.batch_size),
        precision=resolve_precision(cfg.precision, task.device),
        grad_clip=cfg.grad_clip,
        device=task.device,
    )
    metrics = _public_metrics(task.site, len(records), train_loss=stats.loss)
    content = RecordDict({ARRAYS_KEY: state_record(task.model), METRICS_KEY: metrics})
    return Message(content=content, reply_to=message)


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
