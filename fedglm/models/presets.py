"""The built-in model sizes: GLM-4 configurations that `fedglm pretrain` trains from scratch.

Three traps of `Glm4Config` are set explicitly here: `pad_token_id` (default 151329, outside a
small vocabulary), `head_dim` (default 128 whatever the width) and `rms_norm_eps` (default
1.5625e-7). Every party that builds a preset from the same seed builds the same weights:
initialisation runs under a forked, seeded RNG and leaves the caller's RNG alone.
"""

from __future__ import annotations

from typing import Literal

import torch
from transformers import Glm4Config, Glm4ForCausalLM

PresetName = Literal["tiny", "small", "base"]

# name: (hidden, layers, heads, kv heads, head_dim, MLP channels, max positions)
PRESETS: dict[str, tuple[int, int, int, int, int, int, int]] = {
    "tiny": (64, 2, 4, 2, 16, 176, 256),  # quick start and tests: ~0.1 M + the embeddings
    "small": (256, 4, 8, 4, 32, 688, 512),  # benchmarks on a CPU: ~3 M + the embeddings
    "base": (512, 8, 8, 4, 64, 1376, 1024),  # benchmarks on a GPU: ~22 M + the embeddings
}


def glm4_config(
    preset: PresetName, *, vocab_size: int, bos_token_id: int, eos_token_id: int, **overrides: int | float
) -> Glm4Config:
    """A GLM-4 config of the preset's sizes for a tokenizer of `vocab_size`; `overrides` win."""
    hidden, layers, heads, kv_heads, head_dim, channels, positions = PRESETS[preset]
    sizes: dict[str, int | float] = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": channels,
        "max_position_embeddings": positions,
        "rms_norm_eps": 1e-5,
        **overrides,
    }
    return Glm4Config(
        vocab_size=vocab_size,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        tie_word_embeddings=False,
        architectures=["Glm4ForCausalLM"],
        **sizes,
    )


def build_glm4(config: Glm4Config, seed: int) -> Glm4ForCausalLM:
    """A randomly initialised GLM-4 model, the same for the same config and seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Glm4ForCausalLM(config)
    return model.train()
