"""One round of DP-SGD at a site, with Opacus: Poisson-sampled records, per-record clipping,
Gaussian noise.

- The unit of privacy is the record (one patient note). Each step draws every training record
  independently with probability q (Opacus' `UniformWithReplacementSampler`, the sampling
  the accountant assumes); a sampled record contributes one random window of itself.
- A record's loss is the mean next-token loss of its own window only, so its gradient does
  not depend on which other records were drawn; the batch loss is the mean over records and
  Opacus recovers each record's gradient exactly.
- `hooks` mode (default): Opacus' per-sample gradients. Under bf16 autocast they come out in
  bf16; they are cast to fp32 before Opacus computes the per-record norms and clips, so no
  clipped gradient exceeds the clipping norm (in bf16 they reach 1.0023 C).
- `ghost` mode: ghost clipping (two backward passes, no per-sample gradients; less memory).
  It computes norms from the activations, so it runs in fp32 only.
- fp16 autocast with a gradient scaler is refused: its norms overflow, the clip factor becomes
  0 and the model never moves (the noise alone would be released).
- Sampling and noise draw from generators seeded from the operating system's randomness,
  never from the run's seed: the coordinator must not be able to replay them. Only inside a
  test run (pytest's `PYTEST_CURRENT_TEST` set) does `FEDGLM_TEST_DP_SEED` seed them instead,
  so a test that asserts a loss falls under DP noise can be replayed; a process that uses it
  says so in its log.
- The local optimizer only ever sees the noised, averaged gradient (Opacus' `DPOptimizer`
  wraps it), so its state is post-processing too.
- The noised sum is divided by `expected_batch_size`, a public value (declared by the site or
  derived from public values only), never by q times the private record count: otherwise
  the update's scale would tell the coordinator how many records the site holds.
- A record whose per-record gradient (or its norm) is not finite contributes exactly zero:
  in `hooks` mode its rows of the per-sample gradients are zeroed; in `ghost` mode it is
  dropped from the step and the step recomputed from the other records (a NaN inside one
  record's graph would otherwise reach the batch's summed gradient). A coordinator can send
  finite weights that overflow only on a trigger in a record; without this, one drawn record
  would turn the whole update into NaN, an unbounded sensitivity. What a record contributes
  is thus a function of that record alone, with norm at most `clip_norm`, as the accountant
  assumes.
"""

from __future__ import annotations

import math
import os
import secrets
import time
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn

from fedglm.config import Precision
from fedglm.data import IGNORE_INDEX, window_batch
from fedglm.errors import InputError
from fedglm.models.causal import forward_logits
from fedglm.training import ResolvedPrecision, TrainStats, autocast, resolve_precision

DPMode = Literal["hooks", "ghost"]
DP_MODES: tuple[DPMode, ...] = ("hooks", "ghost")


def check_precision(mode: DPMode, precision: ResolvedPrecision) -> str | None:
    """Why DP-SGD cannot run in `precision` with `mode`; None if it can."""
    if precision == "fp16":
        return (
            "DP-SGD with fp16 and a gradient scaler is refused: per-record norms overflow and the "
            "model never moves; use precision bf16, fp32 or auto"
        )
    if mode == "ghost" and precision != "fp32":
        return (
            "ghost clipping computes per-record norms from activations and runs in fp32 only; "
            "use precision fp32 or auto"
        )
    return None


def dp_precision(requested: str, resolved: ResolvedPrecision, mode: DPMode) -> ResolvedPrecision:
    """What `auto` means under DP: never fp16, and fp32 for ghost clipping."""
    if requested == "auto" and (resolved == "fp16" or mode == "ghost"):
        return "fp32"
    return resolved


def dp_precision_for(requested: Precision, device: torch.device, mode: DPMode) -> ResolvedPrecision:
    """The precision a DP round runs in (`dp_precision`), or `InputError` saying why it cannot."""
    precision = dp_precision(requested, resolve_precision(requested, device), mode)
    refused = check_precision(mode, precision)
    if refused is not None:
        raise InputError(refused)
    return precision


TEST_SEED_ENV = "FEDGLM_TEST_DP_SEED"


def secret_generator(device: torch.device | str = "cpu", *, stream: int = 0) -> torch.Generator:
    """A generator seeded from the operating system's randomness (see the module docstring for
    the one exception, in tests); `stream` keeps sampling and noise apart when seeded."""
    seed = _test_seed()
    if seed is None:
        return torch.Generator(device=device).manual_seed(secrets.randbits(63))
    warnings.warn(f"DP sampling and noise seeded from {TEST_SEED_ENV} (a test): not private", stacklevel=2)
    return torch.Generator(device=device).manual_seed(seed * 2 + stream)


def _test_seed() -> int | None:
    value = os.environ.get(TEST_SEED_ENV)
    if value is None or "PYTEST_CURRENT_TEST" not in os.environ:
        return None
    return int(value)


def per_record_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of each row over its own non-padding targets: shape (batch,)."""
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(targets.shape)
    counts = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return nll.sum(dim=1) / counts


def train_private(
    model: nn.Module,
    records: Sequence[list[int]],
    *,
    optimizer: torch.optim.Optimizer,
    q: float,
    sigma: float,
    clip_norm: float,
    steps: int,
    seq_len: int,
    precision: ResolvedPrecision,
    mode: DPMode,
    device: torch.device,
    expected_batch_size: float,
    sampling: torch.Generator | None = None,
    noise: torch.Generator | None = None,
) -> TrainStats:
    """`steps` DP-SGD steps on `model` (in place); the loss is the mean over sampled records
    whose loss is finite. `expected_batch_size` must be public (see the module docstring)."""
    reason = check_precision(mode, precision)
    if reason is not None:
        raise ValueError(reason)
    if not (math.isfinite(expected_batch_size) and expected_batch_size >= 1.0):
        raise ValueError(f"expected_batch_size {expected_batch_size!r}: must be a finite number >= 1")
    sampling = sampling or secret_generator(stream=0)
    noise = noise or secret_generator(device, stream=1)
    params = [p for p in model.parameters() if p.requires_grad]
    module: GradSampleModule | GradSampleModuleFastGradientClipping
    if mode == "hooks":
        module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    else:
        module = GradSampleModuleFastGradientClipping(
            model, batch_first=True, loss_reduction="mean", max_grad_norm=clip_norm, use_ghost_clipping=True
        )
    optimizer_class = DPOptimizer if mode == "hooks" else DPOptimizerFastGradientClipping
    dp_optimizer = optimizer_class(
        optimizer,
        noise_multiplier=sigma,
        max_grad_norm=clip_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=noise,
    )
    sampler = UniformWithReplacementSampler(
        num_samples=len(records), sample_rate=q, generator=sampling, steps=steps
    )
    module.train()
    total_loss, total_tokens, batches = 0.0, 0, 0
    start = time.perf_counter()
    with warnings.catch_warnings():
        # Opacus' hooks fire on the embedding output (token ids need no gradient): expected.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        try:
            for picks in sampler:
                dp_optimizer.zero_grad(set_to_none=True)
                if len(picks) == 0:
                    _empty_batch(params, mode)
                else:
                    inputs, targets = window_batch(records, picks, seq_len=seq_len, generator=sampling)
                    losses = _private_gradients(
                        module, dp_optimizer, params, inputs.to(device), targets.to(device), precision
                    )
                    finite = losses.detach()[torch.isfinite(losses.detach())]
                    if finite.numel():
                        total_loss += float(finite.mean())
                        batches += 1
                    total_tokens += int((targets != IGNORE_INDEX).sum())
                dp_optimizer.step()
        finally:
            module._close()
    seconds = time.perf_counter() - start
    return TrainStats(loss=total_loss / max(batches, 1), steps=steps, tokens=total_tokens, seconds=seconds)


def _private_gradients(
    module: GradSampleModule | GradSampleModuleFastGradientClipping,
    optimizer: DPOptimizer,
    params: list[nn.Parameter],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    precision: ResolvedPrecision,
) -> torch.Tensor:
    """Per-record gradients of one drawn batch, ready for the DP optimizer to clip and noise,
    with every record whose gradient is not finite contributing zero; returns the records'
    losses (those of dropped records included)."""
    with autocast(precision, inputs.device):
        logits = forward_logits(module, inputs)
    losses = per_record_loss(logits, targets)
    if isinstance(module, GradSampleModule):
        _hooks_backward(losses, params)
        return losses
    assert isinstance(optimizer, DPOptimizerFastGradientClipping)
    bad = _ghost_backward(losses, module, optimizer, params)
    if bad is None:
        return losses
    keep = ~bad  # recompute without them: a NaN inside their graph would reach every sum
    optimizer.zero_grad(set_to_none=True)
    if not keep.any():
        _empty_batch(params, "ghost")
        return losses
    kept = _private_gradients(module, optimizer, params, inputs[keep], targets[keep], precision)
    return torch.cat([kept, losses[bad].detach()])


def _hooks_backward(losses: torch.Tensor, params: list[nn.Parameter]) -> None:
    """Opacus' per-sample gradients, in fp32 (see the module docstring), with the rows of
    records whose gradient norm is not finite set to zero."""
    losses.mean().backward()  # type: ignore[no-untyped-call]
    samples = [p for p in params if getattr(p, "grad_sample", None) is not None]
    for p in samples:
        p.grad_sample = p.grad_sample.float()  # type: ignore[attr-defined]
    if not samples:
        return
    norms = torch.stack(
        [p.grad_sample.reshape(len(p.grad_sample), -1).norm(2, dim=-1) for p in samples],  # type: ignore[attr-defined]
        dim=1,
    ).norm(2, dim=1)
    bad = ~torch.isfinite(norms)
    if bad.any():
        for p in samples:
            p.grad_sample[bad] = 0.0  # type: ignore[attr-defined]


def _ghost_backward(
    losses: torch.Tensor,
    module: GradSampleModuleFastGradientClipping,
    optimizer: DPOptimizerFastGradientClipping,
    params: list[nn.Parameter],
) -> torch.Tensor | None:
    """Ghost clipping's two passes (as Opacus' `DPTensorFastGradientClipping.backward`, with a
    check between them): the records whose gradient norm is not finite, else None once the
    clipped sum is in the parameters' `.grad`. With every norm finite, every record's graph
    (its own row: no operation mixes rows) is finite, so the weighted second pass is too."""
    losses.mean().backward(retain_graph=True)  # type: ignore[no-untyped-call]
    norms = module.get_norm_sample()
    bad = ~torch.isfinite(norms)
    if bad.any():
        return bad
    optimizer.zero_grad(set_to_none=True)
    coefficients = module.get_clipping_coef().to(losses.device)
    module.disable_hooks()
    try:
        (coefficients * losses).sum().backward()
    finally:
        module.enable_hooks()
    return None


def _empty_batch(params: list[nn.Parameter], mode: DPMode) -> None:
    """A step that drew no record still releases noise: zero gradients, then the noisy step."""
    for p in params:
        if mode == "hooks":
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)  # type: ignore[attr-defined]
        else:
            p.grad = torch.zeros_like(p)
