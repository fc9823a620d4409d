"""The GLM-style decoder-only transformer that every site fine-tunes.

Pre-norm blocks of `nn.RMSNorm`, causal self-attention built from `nn.Linear` projections with
rotary position embeddings and `F.scaled_dot_product_attention`, a SwiGLU MLP, and an untied LM
head, over a byte-level vocabulary (256 bytes plus BOS and EOS: no tokenizer to download).

Built so Opacus computes exact per-sample gradients (see docs/design.md): no
`nn.MultiheadAttention`, no tied weights, and no buffers at all: the rotary tables are computed
in `forward` from the positions. Initialisation is deterministic from `init_seed`.

Structured pruning (`fedglm/pruning.py`) makes layers narrower than the config: `layer_heads`
and `layer_ff` give each layer's own number of attention heads and SwiGLU channels (None: every
layer has `n_heads` and `d_ff`). The head size stays `d_model / n_heads` either way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedglm.atomic import atomic_write
from fedglm.errors import InputError

BYTE_VOCAB = 256
BOS_ID = 256
EOS_ID = 257
VOCAB_SIZE = 258


@dataclass(frozen=True)
class GLMArgs:
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 176
    max_seq_len: int = 128
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    vocab_size: int = VOCAB_SIZE
    layer_heads: tuple[int, ...] | None = None
    layer_ff: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name, widths in (("layer_heads", self.layer_heads), ("layer_ff", self.layer_ff)):
            if widths is not None and (len(widths) != self.n_layers or min(widths) < 1):
                raise ValueError(f"{name} {widths} must give {self.n_layers} positive widths")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def heads(self, layer: int) -> int:
        return self.n_heads if self.layer_heads is None else self.layer_heads[layer]

    def ff(self, layer: int) -> int:
        return self.d_ff if self.layer_ff is None else self.layer_ff[layer]


def rotary_tables(
    seq_len: int, head_dim: int, base: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (seq_len, head_dim / 2), in fp32."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x (batch, heads, seq, head_dim)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: GLMArgs, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = args.head_dim
        inner = n_heads * args.head_dim
        self.q_proj = nn.Linear(args.d_model, inner, bias=False)
        self.k_proj = nn.Linear(args.d_model, inner, bias=False)
        self.v_proj = nn.Linear(args.d_model, inner, bias=False)
        self.o_proj = nn.Linear(inner, args.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)

        q = apply_rotary(heads(self.q_proj(x)), cos, sin)
        k = apply_rotary(heads(self.k_proj(x)), cos, sin)
        v = heads(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out: torch.Tensor = self.o_proj(y.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim))
        return out


class SwiGLU(nn.Module):
    def __init__(self, args: GLMArgs, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(args.d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, args.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out


class Block(nn.Module):
    def __init__(self, args: GLMArgs, layer: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(args.d_model, eps=args.norm_eps)
        self.attn = Attention(args, args.heads(layer))
        self.mlp_norm = nn.RMSNorm(args.d_model, eps=args.norm_eps)
        self.mlp = SwiGLU(args, args.ff(layer))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        out: torch.Tensor = x + self.mlp(self.mlp_norm(x))
        return out


class GLM(nn.Module):
    """Decoder-only LM: token ids (batch, seq) -> logits (batch, seq, vocab)."""

    def __init__(self, args: GLMArgs) -> None:
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.d_model)
        self.blocks = nn.ModuleList(Block(args, layer) for layer in range(args.n_layers))
        self.norm = nn.RMSNorm(args.d_model, eps=args.norm_eps)
        self.lm_head = nn.Linear(args.d_model, args.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        if seq > self.args.max_seq_len:
            raise ValueError(f"sequence of {seq} tokens exceeds max_seq_len {self.args.max_seq_len}")
        cos, sin = rotary_tables(seq, self.args.head_dim, self.args.rope_base, tokens.device)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits: torch.Tensor = self.lm_head(self.norm(x))
        return logits


def init_weights(model: GLM, seed: int) -> None:
    """Deterministic GPT-2 style initialisation from `seed`, independent of the global RNG."""
    generator = torch.Generator().manual_seed(seed)
    residual_std = 0.02 / math.sqrt(2 * model.args.n_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            values = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
            param.copy_(values)


def build_model(args: GLMArgs, seed: int) -> GLM:
    model = GLM(args)
    init_weights(model, seed)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def parameter_count(args: GLMArgs) -> int:
    """The parameters of a `GLM(args)`, computed without building it (equals
    `count_parameters(GLM(args))`)."""
    d = args.d_model
    total = 2 * args.vocab_size * d + d  # embedding, LM head, final norm
    for layer in range(args.n_layers):
        total += 2 * d + 4 * d * args.heads(layer) * args.head_dim + 3 * d * args.ff(layer)
    return total


def describe(model: GLM) -> dict[str, Any]:
    """A model's shape for reports and the model card."""
    args = model.args
    return {
        "parameters": count_parameters(model),
        "layers": args.n_layers,
        "d_model": args.d_model,
        "heads": [args.heads(i) for i in range(args.n_layers)],
        "ffn_channels": [args.ff(i) for i in range(args.n_layers)],
        "max_seq_len": args.max_seq_len,
        "vocab_size": args.vocab_size,
    }


MODEL_FORMAT = "fedglm-model/1"


def save_model(path: Path, model: GLM) -> None:
    """A model file: its shape (`GLMArgs`) and fp32 weights, written atomically."""
    payload = {
        "format": MODEL_FORMAT,
        "args": asdict(model.args),
        "state": {k: v.detach().float().cpu() for k, v in model.state_dict().items()},
    }
    atomic_write(path, lambda handle: torch.save(payload, handle))


def load_model(path: Path) -> GLM:
    """A model written by `save_model`; an `InputError` line if it is missing or not one."""
    if not path.is_file():
        raise InputError(f"model file {path} does not exist")
    try:
        payload: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != MODEL_FORMAT:
            raise ValueError(f"format {payload.get('format')!r}")
        fields: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in payload["args"].items()
        }
        model = GLM(GLMArgs(**fields))
        model.load_state_dict(payload["state"])
    except Exception as exc:
        raise InputError(f"{path}: not a fedglm model file ({type(exc).__name__}: {str(exc)[:80]})") from None
    return model.eval()
