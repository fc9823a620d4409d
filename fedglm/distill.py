"""Distillation of the federation's final model into a smaller student, on public text only.

The coordinator has no site's records, so distillation runs on public proxy text (FedDF's
setting): either a file named in the config (e.g. PubMedQA contexts or MedQuAD answers from
`../shared/data/`) or clinical-style notes the project generates. It reads only the teacher (the
aggregated, DP-trained model: post-processing) and public text, so it spends no privacy.

The student (`make_student`) is a smaller model of the teacher's family, sharing its tokenizer,
cut from the teacher: `layers` of its layers, evenly spaced with the first and last kept, each
narrowed further by the pruning criterion (`fedglm/models/pruning.py`: the same count of heads
in every KV group and of channels in every layer, so a standard config describes it);
embeddings, final norm and LM head are copied. `distill` then trains it
with Hinton's loss per token: alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE,
AdamW with a linear warm-up and cosine decay.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

from fedglm.data import IGNORE_INDEX, sample_batches
from fedglm.models.causal import forward_logits
from fedglm.models.families import family_of, shape_of
from fedglm.models.lora import load_wire_state, wire_state
from fedglm.models.pruning import Mask, choose_mask, pruned_config, slice_state
from fedglm.training import ResolvedPrecision, autocast, lm_loss, warmup_cosine

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def student_layers(n_teacher: int, n_student: int) -> list[int]:
    """`n_student` of the teacher's layer indices, evenly spaced, first and last kept."""
    if not 1 <= n_student <= n_teacher:
        raise ValueError(f"a student of {n_student} layers from a teacher of {n_teacher}")
    if n_student == 1:
        return [0]
    return sorted({round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)})


def make_student(teacher: Any, *, layers: int, heads: float, channels: float) -> nn.Module:
    """A student initialised from `layers` of the teacher's layers, each keeping the most
    important `1 - heads` of the teacher's heads and `1 - channels` of its channels."""
    config = teacher.config
    family, shape = family_of(config), shape_of(config)
    state = wire_state(teacher)
    whole = Mask.full(shape)  # the teacher's current widths count as whole
    narrow = choose_mask(state, shape, family, whole, heads=heads, channels=channels)
    state = slice_state(state, shape, family, whole, narrow)
    keep = student_layers(shape.layers, layers)
    renumber = {old: new for new, old in enumerate(keep)}
    student_state = {}
    for name, tensor in state.items():
        match = _LAYER.match(name)
        if match is None:
            student_state[name] = tensor.clone()
        elif int(match.group(1)) in renumber:
            new = renumber[int(match.group(1))]
            student_state[_LAYER.sub(f"model.layers.{new}.", name, count=1)] = tensor.clone()
    student_config = pruned_config(config, narrow)
    student_config.num_hidden_layers = len(keep)
    if getattr(student_config, "layer_types", None) is not None:
        student_config.layer_types = [student_config.layer_types[i] for i in keep]
    with torch.random.fork_rng(devices=[]):  # its random initial values are overwritten
        student: nn.Module = AutoModelForCausalLM.from_config(student_config, dtype=torch.float32)
    load_wire_state(student, student_state)
    return student


@dataclass(frozen=True)
class DistillStats:
    loss: float  # mean distillation loss over the last tenth of the steps
    steps: int
    seconds: float


def distill(
    teacher: nn.Module,
    student: nn.Module,
    records: Sequence[list[int]],
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    temperature: float,
    alpha: float,
    precision: ResolvedPrecision,
    device: torch.device,
    seed: int,
) -> DistillStats:
    """Train `student` to match `teacher` on `records` (public text) for `steps` steps."""
    teacher.eval().to(device)
    student.train().to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, warmup=steps // 20, steps=steps)
    batches = sample_batches(
        records,
        batch_size=batch_size,
        seq_len=seq_len,
        generator=torch.Generator().manual_seed(seed),
    )
    tail: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        inputs, targets = next(batches)
        inputs, targets = inputs.to(device), targets.to(device)
        with torch.no_grad(), autocast(precision, device):
            teacher_logits = forward_logits(teacher, inputs)
        with autocast(precision, device):
            student_logits = forward_logits(student, inputs)
        loss = distillation_loss(
            student_logits, teacher_logits, targets, temperature=temperature, alpha=alpha
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step >= steps - max(1, steps // 10):
            tail.append(float(loss.detach()))
    student.eval()
    return DistillStats(loss=sum(tail) / len(tail), steps=steps, seconds=time.perf_counter() - start)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Per real token: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * next-token CE."""
    real = targets != IGNORE_INDEX
    s = F.log_softmax(student_logits.float()[real] / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float()[real] / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2
    return alpha * kl + (1.0 - alpha) * lm_loss(student_logits, targets)
