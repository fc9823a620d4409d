"""Local training and evaluation: flat, readable functions, no Trainer class.

Mixed precision: `auto` picks bf16 autocast where the hardware runs it natively (a CUDA GPU with
bf16, or a CPU with AVX512-BF16 or AMX), fp16 autocast with a gradient scaler on an older GPU,
and fp32 otherwise. Parameters and optimizer state always stay in fp32.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedglm.config import Precision, TrainConfig
from fedglm.data import IGNORE_INDEX, record_windows
from fedglm.models.causal import forward_logits

ResolvedPrecision = Literal["fp32", "bf16", "fp16"]


def cpu_has_native_bf16() -> bool:
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: Precision, device: torch.device) -> ResolvedPrecision:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(precision: ResolvedPrecision, device: torch.device) -> contextlib.AbstractContextManager[None]:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def make_optimizer(
    model: nn.Module, *, name: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected adamw or sgd")


def optimizer_for(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer a round's `train` settings name, over the model's trainable parameters."""
    return make_optimizer(
        model, name=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


def warmup_cosine(
    optimizer: torch.optim.Optimizer, *, warmup: int, steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` steps, then cosine decay to a tenth of the rate at `steps`."""
    warmup = max(1, warmup)

    def factor(step: int) -> float:
        decay = 0.1 + 0.45 * (1 + math.cos(math.pi * min(step, steps) / steps))
        return min(1.0, (step + 1) / warmup) * decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass(frozen=True)
class TrainStats:
    loss: float
    steps: int
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def train_local(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    *,
    optimizer: torch.optim.Optimizer,
    steps: int,
    precision: ResolvedPrecision,
    grad_clip: float | None,
    device: torch.device,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    on_step: Callable[[float], None] | None = None,
) -> TrainStats:
    """Run `steps` optimizer steps on `batches` (stepping `scheduler` after each, and calling
    `on_step` with the step's loss); returns the mean training loss."""
    model.train()
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    total_loss, total_tokens = 0.0, 0
    start = time.perf_counter()
    for _ in range(steps):
        inputs, targets = next(batches)
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast(precision, device):
            logits = forward_logits(model, inputs)
        loss = lm_loss(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        step_loss = float(loss.detach())
        if on_step is not None:
            on_step(step_loss)
        total_loss += step_loss
        total_tokens += int((targets != IGNORE_INDEX).sum())
    seconds = time.perf_counter() - start
    return TrainStats(loss=total_loss / max(steps, 1), steps=steps, tokens=total_tokens, seconds=seconds)


@dataclass(frozen=True)
class EvalStats:
    loss: float
    bits_per_byte: float
    tokens: int


def evaluate(
    model: nn.Module,
    records: Sequence[list[int]],
    *,
    seq_len: int,
    batch_size: int,
    precision: ResolvedPrecision,
    device: torch.device,
    n_bytes: int,
) -> EvalStats:
    """Mean next-token loss (nats) over every token of `records`, and bits per UTF-8 byte.

    Bits per byte divides the summed loss (including the EOS prediction) by ln 2 and by
    `n_bytes`, the UTF-8 bytes of the records' text (`data.text_bytes`), so it compares across
    tokenizers.
    """
    losses = record_losses(
        model, records, seq_len=seq_len, batch_size=batch_size, precision=precision, device=device
    )
    return pooled(losses, n_bytes)


def pooled(losses: Sequence[RecordLoss], n_bytes: int) -> EvalStats:
    """Token-weighted loss and bits per byte of records' summed losses (`record_losses`)."""
    total_nll = sum(loss.nll for loss in losses)
    total_tokens = sum(loss.tokens for loss in losses)
    if total_tokens == 0:
        return EvalStats(loss=float("nan"), bits_per_byte=float("nan"), tokens=0)
    return EvalStats(
        loss=total_nll / total_tokens,
        bits_per_byte=total_nll / math.log(2) / max(n_bytes, 1),
        tokens=total_tokens,
    )


@dataclass(frozen=True)
class RecordLoss:
    """One record's summed next-token loss (nats) and the number of tokens it predicts."""

    nll: float
    tokens: int


@torch.no_grad()
def record_losses(
    model: nn.Module,
    records: Sequence[list[int]],
    *,
    seq_len: int,
    batch_size: int,
    precision: ResolvedPrecision,
    device: torch.device,
) -> list[RecordLoss]:
    """Each record's summed loss over every token it predicts (in `seq_len` windows)."""
    model.eval()
    nll = [0.0] * len(records)
    tokens = [0] * len(records)
    for inputs, targets, owners in record_windows(records, seq_len=seq_len, batch_size=batch_size):
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast(precision, device):
            logits = forward_logits(model, inputs)
        rows = lm_loss(logits, targets, reduction="none").reshape(targets.shape).sum(dim=1)
        counts = (targets != IGNORE_INDEX).sum(dim=1)
        for owner, value, count in zip(owners, rows.tolist(), counts.tolist(), strict=True):
            nll[owner] += value
            tokens[owner] += count
    return [RecordLoss(n, t) for n, t in zip(nll, tokens, strict=True)]


def steps_for(local_steps: int | None, local_epochs: float | None, n_records: int, batch_size: int) -> int:
    """Optimizer steps for one round: fixed, or enough batches for `local_epochs` passes."""
    if local_steps is not None:
        return local_steps
    assert local_epochs is not None
    return max(1, math.ceil(local_epochs * n_records / batch_size))


def private_steps_for(local_steps: int | None, local_epochs: float | None, q: float) -> int:
    """Steps of a DP round; with `local_epochs`, expected passes over the records (epochs / q),
    so the count depends on public q and not on the private record count."""
    if local_steps is not None:
        return local_steps
    assert local_epochs is not None
    return max(1, math.ceil(local_epochs / q))


def held_out(model: nn.Module, records: Sequence[list[int]], seq_len: int, n_bytes: int) -> EvalStats:
    """Loss and bits per byte of `model` (torch or `OnnxLM`) on `records`, fp32 on the CPU: how
    the coordinator scores models on public text (release, `server/public_eval.py`)."""
    return evaluate(
        model,
        records,
        seq_len=seq_len,
        batch_size=16,
        precision="fp32",
        device=torch.device("cpu"),
        n_bytes=n_bytes,
    )
