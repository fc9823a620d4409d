"""LoRA adapters: sites train and send a low-rank change of the projections; the base stays frozen.

`add_adapters` turns the target projections of every layer (any of q/k/v/o of attention and
gate/up/down of the SwiGLU) into `LoRALinear`: the frozen weight W plus trainable A (rank x in)
and B (out x rank), computing `x W^T + (alpha / rank) x A^T B^T` (Hu et al., 2021). B starts
at zero, so an adapted model gives exactly the base model's logits until it trains; A is drawn
from a seed, so every party that builds the adapters builds the same ones.

Names: W keeps its name (`blocks.0.attn.q_proj.weight`), so a base model's weights load
unchanged; the adapter tensors are `...q_proj.lora_a.weight` and `...q_proj.lora_b.weight`.
A and B are plain `nn.Linear` layers, so Opacus computes their per-record gradients (hooks or
ghost clipping) and never sees a frozen weight; every other parameter is frozen too.

`merge_adapters` folds `W + (alpha / rank) B A` into plain weights: the model that pruning ranks
and that distillation and export start from.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedglm.model import GLM, Block

LoraTarget = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGETS: tuple[LoraTarget, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

_ADAPTER = re.compile(r"^(.*)\.lora_(a|b)\.weight$")


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]
    seed: int = 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """A frozen linear map plus a trainable low-rank change (`lora_b @ lora_a`, scaled)."""

    def __init__(self, base: nn.Linear, rank: int, scale: float) -> None:
        super().__init__(base.in_features, base.out_features, bias=False, device=base.weight.device)
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.lora_a = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        change: torch.Tensor = self.lora_b(self.lora_a(x))
        return F.linear(x, self.weight) + change * self.scale


def is_adapter(name: str) -> bool:
    return _ADAPTER.match(name) is not None


def _projections(model: GLM, targets: Sequence[str]) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of each target projection, layer by layer, in a fixed order."""
    found: list[tuple[nn.Module, str]] = []
    for block in model.blocks:
        assert isinstance(block, Block)
        for target in targets:
            parent = block.attn if hasattr(block.attn, target) else block.mlp
            found.append((parent, target))
    return found


def add_adapters(model: GLM, spec: LoraSpec) -> GLM:
    """Freeze `model` and give each target projection an adapter (in place; returns `model`)."""
    for param in model.parameters():
        param.requires_grad_(False)
    generator = torch.Generator().manual_seed(spec.seed)
    for parent, attr in _projections(model, spec.targets):
        base = getattr(parent, attr)
        adapted = LoRALinear(base, spec.rank, spec.scale)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(base.in_features)  # the default nn.Linear range, seeded
            a = torch.rand(adapted.lora_a.weight.shape, generator=generator) * 2 * bound - bound
            adapted.lora_a.weight.copy_(a)
            adapted.lora_b.weight.zero_()
        setattr(parent, attr, adapted)
    return model


def adapter_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t for name, t in state.items() if is_adapter(name)}


def base_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t for name, t in state.items() if not is_adapter(name)}


def merge_adapters(state: Mapping[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Plain GLM weights: each adapted W replaced by `W + scale * B @ A`, adapters dropped."""
    merged = base_state(state)
    for name, tensor in state.items():
        match = _ADAPTER.match(name)
        if match is None or match.group(2) != "a":
            continue
        prefix = match.group(1)
        b = state[f"{prefix}.lora_b.weight"].float()
        weight = f"{prefix}.weight"
        merged[weight] = (state[weight].float() + scale * (b @ tensor.float())).contiguous()
    return merged
