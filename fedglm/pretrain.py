"""`fedglm pretrain`: the coordinator trains a base model on public text, and nothing else.

DP fine-tuning from a model that already knows the language comes close to non-private quality
at epsilon 3-8, while DP training from random weights spends most of the budget learning the
language. So a federation starts from a base model, and the base's provenance (it saw only
public data) is part of what the model card states.

Training uses the sites' training function (`training.train_local`: mixed precision, gradient
clipping) on windows of the public records, with AdamW and a warm-up + cosine schedule.

Files in `out_dir`:
- `pretrain-state.pt`: model, optimizer, schedule, the sampler's random state and the step,
  replaced atomically every `checkpoint_every` steps. Restarting with the same config resumes
  from it, and ends with exactly the weights an uninterrupted run ends with; a state left by
  another config is refused, never mixed in.
- `base.pt`: the base model (`model.save_model`).
- `base.json`, the manifest: the model config, the base's hash (SHA-256 of its weights as
  payload headers compute it: what the coordinator announces and a site may pin), the SHA-256
  of every input file (or the generator's settings), the training settings, the steps, and the
  final held-out loss and bits per byte.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from fedglm.atomic import atomic_write, atomic_write_text
from fedglm.compression import model_hash
from fedglm.config import DataConfig, FederationConfig, ModelConfig, PretrainConfig, validate_config
from fedglm.corpus import generate_public_records
from fedglm.data import encode, infer_format, load_records, sample_batches, split_records
from fedglm.errors import InputError
from fedglm.layout import BASE_FILE, MANIFEST_FILE, PRETRAIN_STATE_FILE
from fedglm.model import GLM, build_model, count_parameters, load_model, save_model
from fedglm.training import (
    EvalStats,
    ResolvedPrecision,
    evaluate,
    make_optimizer,
    resolve_precision,
    train_local,
    warmup_cosine,
)

MANIFEST_FORMAT = "fedglm-base/1"
STATE_FORMAT = "fedglm-pretrain/1"
EVAL_RECORDS = 256  # held-out records measured at each checkpoint (the first, in split order)


class OtherConfigState(InputError):
    """The pretraining state in `out_dir` was saved under another config."""


@dataclass(frozen=True)
class PublicCorpus:
    train: list[list[int]]
    val: list[list[int]]
    sources: list[dict[str, Any]]  # what the manifest records of each input


def file_digest(path: Path) -> str:
    """SHA-256 of a file, or of a folder's .txt files (names and bytes, in name order)."""
    digest = hashlib.sha256()
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.name.encode("utf-8") + b"\x00")
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _source(data: DataConfig) -> tuple[list[str], list[str], dict[str, Any]]:
    records = load_records(data.path, data.format, data.field)
    split = split_records(records, data.val_fraction, data.split_seed)
    info = {
        "path": str(data.path),
        "format": data.format or infer_format(data.path),
        "field": data.field,
        "sha256": file_digest(data.path),
        "records": len(records),
    }
    return split.train, split.val, info


def public_corpus(cfg: PretrainConfig) -> PublicCorpus:
    """The configured public records (or generated notes), encoded, split by record."""
    train: list[str] = []
    val: list[str] = []
    sources: list[dict[str, Any]] = []
    if not cfg.text:
        records = generate_public_records(cfg.generated_records, cfg.seed)
        split = split_records(records, 0.1, cfg.seed)
        train, val = split.train, split.val
        sources.append({"generated": "fedglm.corpus.generate_public_records", "records": len(records)})
    for data in cfg.text:
        more_train, more_val, info = _source(data)
        train += more_train
        val += more_val
        sources.append(info)
    return PublicCorpus([encode(t) for t in train], [encode(t) for t in val], sources)


def _fingerprint(cfg: PretrainConfig, corpus: PublicCorpus) -> str:
    """What a resumed run must share with the run that saved the state."""
    settings = cfg.model_dump(mode="json", exclude={"out_dir", "resume", "checkpoint_every", "text"})
    settings["sources"] = corpus.sources
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pretrain(
    cfg: PretrainConfig,
    *,
    on_step: Callable[[int, float], None] | None = None,
    on_checkpoint: Callable[[int, EvalStats], None] | None = None,
) -> dict[str, Any]:
    """Train (or resume, or finish) the base model of `cfg`; returns its manifest.

    `on_step(step, loss)` follows every optimizer step; `on_checkpoint(step, held_out)` every
    saved state.
    """
    corpus = public_corpus(cfg)
    device = _device()
    precision = resolve_precision(cfg.precision, device)
    fingerprint = _fingerprint(cfg, corpus)
    model = build_model(cfg.model.glm_args(), cfg.model.init_seed).to(device)
    optimizer = make_optimizer(model, name="adamw", lr=cfg.lr, momentum=0.0, weight_decay=cfg.weight_decay)
    schedule = warmup_cosine(optimizer, warmup=cfg.warmup_steps, steps=cfg.steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    step = 0
    history: list[dict[str, float]] = []
    saved = _load_state(cfg.out_dir, fingerprint) if cfg.resume else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        generator.set_state(saved["generator"])
        step, history = int(saved["step"]), list(saved["history"])
    held_out = corpus.val[:EVAL_RECORDS]
    numbers = itertools.count(step + 1)
    report = None if on_step is None else (lambda loss: on_step(next(numbers), loss))
    while step < cfg.steps:
        chunk = min(cfg.checkpoint_every, cfg.steps - step)
        stats = train_local(
            model,
            sample_batches(corpus.train, batch_size=cfg.batch_size, seq_len=cfg.seq_len, generator=generator),
            optimizer=optimizer,
            steps=chunk,
            precision=precision,
            grad_clip=cfg.grad_clip,
            device=device,
            scheduler=schedule,
            on_step=report,
        )
        step += chunk
        val = _held_out(model, held_out, cfg, precision, device)
        history.append({"step": step, "train_loss": stats.loss, "val_loss": val.loss})
        _save_state(cfg.out_dir, fingerprint, step, model, optimizer, schedule, generator, history)
        if on_checkpoint is not None:
            on_checkpoint(step, val)
    model = model.cpu().eval()
    cpu = torch.device("cpu")
    final = _held_out(model, held_out, cfg, resolve_precision(cfg.precision, cpu), cpu)
    save_model(cfg.out_dir / BASE_FILE, model)
    manifest = {
        "format": MANIFEST_FORMAT,
        "model": cfg.model.model_dump(mode="json"),
        "parameters": count_parameters(model),
        "model_hash": model_hash(model.state_dict()).hex(),
        "public_data_only": True,
        "inputs": corpus.sources,
        "training": cfg.model_dump(mode="json", exclude={"model", "text", "out_dir", "resume"}),
        "steps": step,
        "train_records": len(corpus.train),
        "held_out_records": len(held_out),
        "final": {"val_loss": final.loss, "val_bits_per_byte": final.bits_per_byte},
        "history": history,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write_text(cfg.out_dir / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _held_out(
    model: GLM,
    records: list[list[int]],
    cfg: PretrainConfig,
    precision: ResolvedPrecision,
    device: torch.device,
) -> EvalStats:
    return evaluate(model, records, seq_len=cfg.seq_len, batch_size=32, precision=precision, device=device)


def _save_state(
    out_dir: Path,
    fingerprint: str,
    step: int,
    model: GLM,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    history: list[dict[str, float]],
) -> None:
    payload = {
        "format": STATE_FORMAT,
        "fingerprint": fingerprint,
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "generator": generator.get_state(),
        "history": history,
    }
    atomic_write(out_dir / PRETRAIN_STATE_FILE, lambda handle: torch.save(payload, handle))


def _load_state(out_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    path = out_dir / PRETRAIN_STATE_FILE
    if not path.exists():
        return None
    try:
        payload: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        ok = payload.get("format") == STATE_FORMAT
    except Exception:
        ok = False
    if not ok:
        raise InputError(f"{path} is not a fedglm pretraining state; delete it or set resume: false")
    if payload["fingerprint"] != fingerprint:
        raise OtherConfigState(
            f"{path} was saved by a pretraining run with another config or other input files; "
            "use another out_dir, or set resume: false to start over"
        )
    return payload


@dataclass(frozen=True)
class Base:
    """A base model and its manifest, checked against each other."""

    model: GLM
    manifest: dict[str, Any]
    hash: str  # hex SHA-256 of the weights (`compression.model_hash`)

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.model_validate(self.manifest["model"])


def load_base(path: Path) -> Base:
    """`base.pt` (or the folder holding it) with its `base.json`; an `InputError` if either is
    missing, unreadable, or if the weights do not hash to what the manifest records."""
    if path.is_dir():
        path = path / BASE_FILE
    manifest_path = path.with_name(MANIFEST_FILE)
    if not manifest_path.is_file():
        raise InputError(
            f"base model {path}: no manifest {manifest_path} beside it (made by fedglm pretrain)"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {manifest.get('format') if isinstance(manifest, dict) else None!r}")
        recorded = str(manifest["model_hash"])
        ModelConfig.model_validate(manifest["model"])
    except Exception as exc:
        raise InputError(f"{manifest_path}: not a fedglm base manifest ({exc})") from None
    model = load_model(path)
    actual = model_hash(model.state_dict()).hex()
    if actual != recorded:
        raise InputError(
            f"base model {path} hashes to {actual[:16]}..., its manifest records {recorded[:16]}...: "
            "the file was changed or replaced; use the base.pt written with this manifest"
        )
    return Base(model, manifest, actual)


def federation_from_base(fed: FederationConfig) -> FederationConfig:
    """`fed` with the model shape of its base (if it names one); an `InputError` if the config
    also states another shape."""
    if fed.base is None:
        return fed
    base = load_base(fed.base)
    shape = base.model_config
    if "model" in fed.model_fields_set and fed.model.glm_args() != shape.glm_args():
        raise InputError(
            f"federation.model ({_shape(fed.model)}) is not the shape of the base model {fed.base} "
            f"({_shape(shape)}); remove federation.model to take the base's shape"
        )
    data = {**fed.model_dump(), "model": shape.model_dump()}
    return validate_config(data, FederationConfig, source=f"federation with base {fed.base}")


def _shape(model: ModelConfig) -> str:
    return f"d_model {model.d_model}, {model.n_layers} layers, {model.n_heads} heads, d_ff {model.d_ff}"
