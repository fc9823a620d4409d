"""Tiny models of each tested family, built from a config with random weights."""

from __future__ import annotations

import torch
from transformers import (
    Glm4Config,
    Glm4ForCausalLM,
    GlmConfig,
    GlmForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import fedglm.models  # noqa: F401  (quiet, offline transformers)

VOCAB = 300
ARCHITECTURES = ["Glm4ForCausalLM", "GlmForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM"]
_CLASSES = {
    "Glm4ForCausalLM": (Glm4Config, Glm4ForCausalLM),
    "GlmForCausalLM": (GlmConfig, GlmForCausalLM),
    "LlamaForCausalLM": (LlamaConfig, LlamaForCausalLM),
    "Qwen2ForCausalLM": (Qwen2Config, Qwen2ForCausalLM),
}


def tiny_model(architecture: str, seed: int = 0, **overrides: int) -> PreTrainedModel:
    """A random model of `architecture`: hidden 64, 2 layers, 4 query heads in 2 KV groups."""
    config_class, model_class = _CLASSES[architecture]
    sizes = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 128,
        **overrides,
    }
    config = config_class(
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=1,
        rms_norm_eps=1e-5,
        architectures=[architecture],
        **sizes,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model.train()
