"""LoRA adapters through PEFT, aggregated exactly: A is shared and frozen, only B trains.

Averaging each site's A and B separately is not the average of their changes B·A: with
clients drifting apart the merged change was off by 5% to 64% (../shared/notes/hf_models.md,
measured again by `bench/lora_aggregation.py`). fedglm freezes A (FFA-LoRA, Sun et al., ICLR
2024): every party draws the same A from the run's seed, sites train only B, and since the
change `scale · B·A` is linear in B, the mean of the sites' B gives exactly the mean of their
changes. It also halves what a site sends, and with fewer trainable parameters DP noise is
spread over fewer coordinates.

PEFT's `LoraConfig` builds the layers (`get_peft_model`): dropout 0, no bias adapters, targets
among the family's projections (`families.py`; GLM's fused `gate_up_proj` included). A is
redrawn from `spec.seed` module by module in a fixed order (uniform in ±1/sqrt(in), PEFT's
default range) and B starts at zero, so an adapted model gives the base model's logits.

Wire names: the state that travels and is hashed uses transformers' own names for base weights
(`model.layers.0.self_attn.q_proj.weight`) and `<module>.lora_A.weight` / `<module>.lora_B.weight`
for adapters; `wire_state` and `load_wire_state` translate PEFT's names both ways, so the wire
does not depend on PEFT's internal prefixes.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from fedglm.models.families import Family

_ADAPTER = re.compile(r"^(.*)\.lora_(A|B)\.weight$")
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]
    seed: int = 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def check_targets(targets: tuple[str, ...], family: Family) -> None:
    """ValueError naming a target that is not a projection of this family."""
    for target in targets:
        if target not in family.projections:
            raise ValueError(
                f"lora target {target!r} is not a projection of {family.architecture} "
                f"(it has {', '.join(family.projections)})"
            )


def add_adapters(model: nn.Module, spec: LoraSpec) -> PeftModel:
    """`model` frozen with adapters on `spec.targets` of every layer: A seeded and frozen, B zero."""
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=list(spec.targets),
        lora_dropout=0.0,
        bias="none",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 deprecations PEFT still calls
        adapted: PeftModel = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            wire = wire_name(name)
            match = _ADAPTER.match(wire)
            if match is None:
                param.requires_grad_(False)
            elif match.group(2) == "A":
                bound = 1.0 / math.sqrt(param.shape[1])
                param.copy_(torch.rand(param.shape, generator=generator) * 2 * bound - bound)
                param.requires_grad_(False)
            else:
                param.zero_()
                param.requires_grad_(True)
    return adapted


def wire_name(name: str) -> str:
    """PEFT's parameter name -> the name on the wire (identity for a plain model's names)."""
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    return name.replace(".base_layer.", ".").replace(".default.", ".")


def wire_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict under wire names (detached, as held by the model)."""
    return {wire_name(name): tensor.detach() for name, tensor in model.state_dict().items()}


def load_wire_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a wire-named state into `model` (plain or PEFT); every tensor must match."""
    names = {wire_name(name): name for name in model.state_dict()}
    if set(names) != set(state):
        missing, extra = sorted(set(names) - set(state)), sorted(set(state) - set(names))
        raise ValueError(f"state does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    model.load_state_dict({names[wire]: tensor for wire, tensor in state.items()}, strict=True)


def is_adapter(name: str) -> bool:
    return _ADAPTER.match(name) is not None


def is_trained_adapter(name: str) -> bool:
    """The adapter tensors sites train and send: B (A is frozen and the same everywhere)."""
    match = _ADAPTER.match(name)
    return match is not None and match.group(2) == "B"


def base_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t for name, t in state.items() if not is_adapter(name)}


def merge_adapters(state: Mapping[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Plain weights: each adapted W replaced by `W + scale · B·A`, adapters dropped."""
    merged = base_state(state)
    for name, a in state.items():
        match = _ADAPTER.match(name)
        if match is None or match.group(2) != "A":
            continue
        prefix = match.group(1)
        b = state[f"{prefix}.lora_B.weight"].float()
        weight = f"{prefix}.weight"
        merged[weight] = (state[weight].float() + scale * (b @ a.float())).contiguous()
    return merged
