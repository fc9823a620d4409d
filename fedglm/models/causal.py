"""Calling a Hugging Face causal LM the way fedglm trains it: token ids in, logits out.

`use_cache=False` (no KV cache is built in training or evaluation) and position ids expanded
per sample: with one shared (1, T) tensor a rotary model mixes samples in what Opacus sees, and
per-record gradients need every tensor to have the batch as its first dimension.
"""

from __future__ import annotations

import torch
from torch import nn


def forward_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(batch, seq) token ids -> (batch, seq, vocab) logits of a causal LM (or an Opacus wrap)."""
    batch, seq = tokens.shape
    positions = torch.arange(seq, device=tokens.device).unsqueeze(0).expand(batch, seq)
    out = model(input_ids=tokens, position_ids=positions, use_cache=False)
    if isinstance(out, torch.Tensor):  # a model that returns logits itself (an ONNX session's wrapper)
        return out
    result: torch.Tensor = out.logits
    return result
