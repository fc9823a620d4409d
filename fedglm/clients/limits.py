"""What a site refuses to run, whatever the coordinator sends: checked before anything is
allocated or trained.

The site brings the base model itself (its own folder), but the coordinator chooses the weights
it trains from, what trains (LoRA rank and targets, or everything) and the training settings. A
site trusts none of it, so before building a model it checks that training fits in its memory,
and before training on received weights it checks them:
- **Size.** Training needs the weights (fp32) and, per trained parameter, its gradient and two
  optimizer moments, and under DP-SGD in `hooks` mode one per-sample gradient for each record of
  the expected batch (a public number, so the decision reveals nothing private). A round whose
  estimate exceeds `MEMORY_FRACTION` of this machine's physical memory is refused.
- **Weights.** Every received weight must be finite and at most `MAX_WEIGHT` in magnitude.
  Trained transformers keep their weights within a few units (norm gains, projections; the
  largest outliers reported for billion-parameter LLMs are in the tens to low hundreds), and
  fp16 serving overflows at 65,504: 1e4 leaves two orders of magnitude for legitimate models
  and refuses the absurd values a crafted model uses to overflow activations. This bound is
  not what protects privacy against such a model (finite weights within it can still
  overflow on a trigger); the per-record guard of `privacy/dpsgd.py` is.
- **Steps.** A DP round's steps (`local_epochs / q` can be large when q is small) are at most
  `MAX_ROUND_STEPS`, as `train.local_steps` is.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from fedglm.compression import PayloadError

MAX_WEIGHT = 1e4
MAX_ROUND_STEPS = 100_000
MEMORY_FRACTION = 0.8
BYTES_PER_VALUE = 4
STATE_COPIES = 4  # weights, gradient, two optimizer moments


def physical_memory() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def training_bytes(parameters: int, trained: int, per_sample_rows: float) -> int:
    """A lower estimate of the memory one training step takes (activations left out)."""
    return int(BYTES_PER_VALUE * (parameters + trained * (STATE_COPIES - 1 + per_sample_rows)))


def check_model_fits(
    parameters: int, trained: int, per_sample_rows: float, memory: int | None = None
) -> None:
    """Refuse (`PayloadError` "model-too-large") a round this site could not train."""
    need = training_bytes(parameters, trained, per_sample_rows)
    have = int(MEMORY_FRACTION * (memory if memory is not None else physical_memory()))
    if need > have:
        raise PayloadError(
            f"training {trained:,} of the model's {parameters:,} parameters needs about "
            f"{need / 2**30:.1f} GiB here; this site has {have / 2**30:.1f} GiB for it",
            "model-too-large",
        )


def check_weights(state: Mapping[str, torch.Tensor]) -> None:
    """Refuse (`PayloadError` "bad-weights") weights that are not finite or exceed `MAX_WEIGHT`."""
    for name, tensor in state.items():
        if not bool(torch.isfinite(tensor).all()):
            raise PayloadError(f"the received model's {name} holds NaN or infinite values", "bad-weights")
        peak = float(tensor.abs().max()) if tensor.numel() else 0.0
        if peak > MAX_WEIGHT:
            raise PayloadError(
                f"the received model's {name} holds a weight of magnitude {peak:.3g}, above the "
                f"{MAX_WEIGHT:g} a site accepts",
                "bad-weights",
            )


def check_round_steps(steps: int) -> None:
    if steps > MAX_ROUND_STEPS:
        raise PayloadError(
            f"the round asks for {steps:,} DP-SGD steps, more than the {MAX_ROUND_STEPS:,} a site runs",
            "too-many-steps",
        )
