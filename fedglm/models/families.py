"""The Hugging Face architectures fedglm fine-tunes, and where each keeps its projections.

Four decoder families are tested end to end: `Glm4ForCausalLM` (first), `GlmForCausalLM`,
`LlamaForCausalLM` and `Qwen2ForCausalLM`. They share one layout, which pruning, LoRA and the
wire rely on: `model.layers.{i}.self_attn.{q,k,v,o}_proj` (grouped-query attention through
`num_key_value_heads`; q/k/v biases in GLM, GLM-4 and Qwen2, in Llama when `attention_bias`) and
an MLP whose input side is either one fused `gate_up_proj` (GLM, GLM-4: gate rows first, then up
rows) or separate `gate_proj` and `up_proj` (Llama, Qwen2), followed by `down_proj`. Any other
architecture is refused with one line naming it: an untested layout could be pruned or sliced
wrongly without any error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedglm.errors import InputError


@dataclass(frozen=True)
class Family:
    architecture: str  # the `architectures` entry of config.json
    model_type: str  # config.json's `model_type`
    fused_gate_up: bool  # one `gate_up_proj` (gate rows, then up rows) instead of gate/up

    @property
    def mlp_inputs(self) -> tuple[str, ...]:
        """The MLP projections whose output rows are the channels."""
        return ("gate_up_proj",) if self.fused_gate_up else ("gate_proj", "up_proj")

    @property
    def projections(self) -> tuple[str, ...]:
        """Every linear projection of a layer, in a fixed order (LoRA's default targets)."""
        return ("q_proj", "k_proj", "v_proj", "o_proj", *self.mlp_inputs, "down_proj")


FAMILIES: dict[str, Family] = {
    family.architecture: family
    for family in (
        Family("Glm4ForCausalLM", "glm4", fused_gate_up=True),
        Family("GlmForCausalLM", "glm", fused_gate_up=True),
        Family("LlamaForCausalLM", "llama", fused_gate_up=False),
        Family("Qwen2ForCausalLM", "qwen2", fused_gate_up=False),
    )
}
ATTENTION = "model.layers.{layer}.self_attn.{proj}"
MLP = "model.layers.{layer}.mlp.{proj}"


def family_of(config: Any, where: str = "config.json") -> Family:
    """The family of a transformers config (or config.json's dict); InputError if untested."""
    architectures = config.get("architectures") if isinstance(config, dict) else config.architectures
    if (
        not isinstance(architectures, list)
        or len(architectures) != 1
        or not isinstance(architectures[0], str)
    ):
        raise InputError(
            f"{where}: `architectures` must name one model class (got {str(architectures)[:80]}); "
            f"fedglm fine-tunes {', '.join(FAMILIES)}"
        )
    family = FAMILIES.get(architectures[0])
    if family is None:
        raise InputError(
            f"{where}: architecture {architectures[0][:80]!r} is not one fedglm has tested; "
            f"use a {', '.join(FAMILIES)} checkpoint"
        )
    return family


@dataclass(frozen=True)
class Shape:
    """What pruning and LoRA need of a config: sizes shared by every layer."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    channels: int  # intermediate_size: MLP channels per layer

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads


def shape_of(config: Any) -> Shape:
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Shape(
        layers=int(config.num_hidden_layers),
        hidden=int(config.hidden_size),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=int(head_dim),
        channels=int(config.intermediate_size),
    )


def describe(model: Any) -> dict[str, Any]:
    """A model's shape for reports and the model card."""
    config = model.config
    shape = shape_of(config)
    return {
        "architecture": family_of(config).architecture,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": shape.layers,
        "d_model": shape.hidden,
        "heads": [shape.heads] * shape.layers,
        "ffn_channels": [shape.channels] * shape.layers,
        "max_seq_len": int(getattr(config, "max_position_embeddings", 0) or 0),
        "vocab_size": int(config.vocab_size),
    }
