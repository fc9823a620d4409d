"""`fedglm pretrain`: the coordinator trains a base model on public text, and nothing else.

DP fine-tuning from a model that already knows the language comes close to non-private quality
at epsilon 3-8, while DP training from random weights spends most of the budget learning the
language. So a federation starts from a base model, and the base's provenance (it saw only
public data) is part of what the model card states.

First a byte-level BPE tokenizer is trained on the public training records
(`models/tokenizer.py`), then a GLM-4 model of the configured preset (`models/presets.py`) with
the sites' training function (`training.train_local`: mixed precision, gradient clipping) on
windows of the public records, with AdamW and a warm-up + cosine schedule.

Files in `out_dir`:
- `pretrain-state.pt`: model, optimizer, schedule, the sampler's random state, the step and the
  tokenizer, replaced atomically every `checkpoint_every` steps. Restarting with the same config
  resumes from it, and ends with exactly the weights an uninterrupted run ends with; a state left
  by another config is refused, never mixed in.
- `model/`: the base, a standard Hugging Face folder (`AutoModelForCausalLM.from_pretrained`
  and `AutoTokenizer.from_pretrained` load it), with `fedglm-base.json` inside, the manifest:
  the preset, the folder's hash (what the coordinator announces and sites check their copy
  against), the SHA-256 of every input file (or the generator's settings), the training
  settings, the steps, and the final held-out loss and bits per byte.
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
from tokenizers import Tokenizer
from torch import nn
from transformers import PreTrainedTokenizerFast

from fedglm.atomic import atomic_write, atomic_write_text
from fedglm.config import DataConfig, PretrainConfig
from fedglm.corpus import generate_public_records
from fedglm.data import infer_format, load_records, sample_batches, split_records, text_bytes
from fedglm.errors import InputError
from fedglm.layout import BASE_MANIFEST, BASE_MODEL_DIR, PRETRAIN_STATE_FILE
from fedglm.models.folder import folder_hash, save_folder
from fedglm.models.presets import build_glm4, glm4_config
from fedglm.models.tokenizer import BOS, EOS, encode_records, train_tokenizer
from fedglm.training import (
    EvalStats,
    ResolvedPrecision,
    evaluate,
    make_optimizer,
    resolve_precision,
    train_local,
    warmup_cosine,
)

MANIFEST_FORMAT = "fedglm-base/2"
STATE_FORMAT = "fedglm-pretrain/2"
EVAL_RECORDS = 256  # held-out records measured at each checkpoint (the first, in split order)


class OtherConfigState(InputError):
    """The pretraining state in `out_dir` was saved under another config."""


@dataclass(frozen=True)
class PublicCorpus:
    train: list[str]
    val: list[str]
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
    """The configured public records (or generated notes), split by record."""
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
    return PublicCorpus(train, val, sources)


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
    saved = _load_state(cfg.out_dir, fingerprint) if cfg.resume else None
    if saved is not None:
        tokenizer = _wrap(Tokenizer.from_str(saved["tokenizer"]))
    else:
        tokenizer = train_tokenizer(corpus.train, cfg.model.vocab_size)
    config = glm4_config(
        cfg.model.preset,
        vocab_size=len(tokenizer),
        bos_token_id=int(tokenizer.bos_token_id),
        eos_token_id=int(tokenizer.eos_token_id),
    )
    model = build_glm4(config, cfg.model.init_seed).to(device)
    train_ids = encode_records(tokenizer, corpus.train)
    optimizer = make_optimizer(model, name="adamw", lr=cfg.lr, momentum=0.0, weight_decay=cfg.weight_decay)
    schedule = warmup_cosine(optimizer, warmup=cfg.warmup_steps, steps=cfg.steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    step = 0
    history: list[dict[str, float]] = []
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        generator.set_state(saved["generator"])
        step, history = int(saved["step"]), list(saved["history"])
    held_out = corpus.val[:EVAL_RECORDS]
    held_ids = encode_records(tokenizer, held_out)
    numbers = itertools.count(step + 1)
    report = None if on_step is None else (lambda loss: on_step(next(numbers), loss))
    while step < cfg.steps:
        chunk = min(cfg.checkpoint_every, cfg.steps - step)
        stats = train_local(
            model,
            sample_batches(train_ids, batch_size=cfg.batch_size, seq_len=cfg.seq_len, generator=generator),
            optimizer=optimizer,
            steps=chunk,
            precision=precision,
            grad_clip=cfg.grad_clip,
            device=device,
            scheduler=schedule,
            on_step=report,
        )
        step += chunk
        val = _held_out(model, held_ids, text_bytes(held_out), cfg, precision, device)
        history.append({"step": step, "train_loss": stats.loss, "val_loss": val.loss})
        _save_state(cfg.out_dir, fingerprint, step, model, optimizer, schedule, generator, history, tokenizer)
        if on_checkpoint is not None:
            on_checkpoint(step, val)
    model = model.cpu().eval()
    cpu = torch.device("cpu")
    final = _held_out(model, held_ids, text_bytes(held_out), cfg, resolve_precision(cfg.precision, cpu), cpu)
    folder = cfg.out_dir / BASE_MODEL_DIR
    save_folder(model, tokenizer, folder)
    manifest = {
        "format": MANIFEST_FORMAT,
        "model": cfg.model.model_dump(mode="json"),
        "architecture": "Glm4ForCausalLM",
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "folder_hash": folder_hash(folder),
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
    atomic_write_text(folder / BASE_MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=EOS)


def _held_out(
    model: nn.Module,
    records: list[list[int]],
    n_bytes: int,
    cfg: PretrainConfig,
    precision: ResolvedPrecision,
    device: torch.device,
) -> EvalStats:
    return evaluate(
        model,
        records,
        seq_len=cfg.seq_len,
        batch_size=32,
        precision=precision,
        device=device,
        n_bytes=n_bytes,
    )


def _save_state(
    out_dir: Path,
    fingerprint: str,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    history: list[dict[str, float]],
    tokenizer: PreTrainedTokenizerFast,
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
        "tokenizer": tokenizer.backend_tokenizer.to_str(),
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


def read_base_manifest(folder: Path) -> dict[str, Any] | None:
    """The `fedglm pretrain` manifest inside a base folder, if it has one and it describes this
    folder (its recorded hash is the folder's); None for a checkpoint from elsewhere."""
    path = folder / BASE_MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise InputError(f"{path}: unreadable base manifest; delete it or pretrain again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise InputError(f"{path}: not a fedglm base manifest (format {MANIFEST_FORMAT})")
    if manifest.get("folder_hash") != folder_hash(folder):
        raise InputError(
            f"{path} records another folder hash than {folder}'s: the model or tokenizer files were "
            "changed after pretraining; restore them or pretrain again"
        )
    return manifest
