"""Hugging Face causal LMs to ONNX: a logits graph, a KV-cache graph, and their parity in ONNX Runtime.

Two graphs, both from `torch.onnx.export(dynamo=True)` of a small wrapper around the model:

- `export_logits`: `input_ids` (batch, seq) -> `logits` (batch, seq, vocab), `use_cache=False`
  and position ids per sample (as fedglm.models.causal.forward_logits in training). For scoring, for
  the INT8 / FP16 variants (`quantize_int8`, `convert_fp16` of fedglm.export.onnx), and for
  generation without a cache (the whole sequence again for every new token).
- `export_with_cache`: one step of incremental decoding. Inputs `input_ids` (batch, new_seq),
  `position_ids` (batch, new_seq) and, per layer i, `past_key_values.{i}.key` / `.value`
  (batch, kv_heads, past_seq, head_dim; `past_seq` may be 0, which is the prefill); outputs
  `logits` (batch, new_seq, vocab) and `present.{i}.key` / `.value` (batch, kv_heads,
  past_seq + new_seq, head_dim), the next step's past. The wrapper turns the plain tensors into a
  transformers `DynamicCache`, so the model's own attention appends to the cache and builds the
  causal mask offset by the past; the traced graph concatenates past and new keys, and the
  exported graph is correct for any past length, 0 included (checked by `cache_parity` against
  torch's full-sequence logits). There is no attention mask input: sequences in a batch have the
  same length (no padding), which is how fedglm.generate calls it (one prompt).

Exports refuse an architecture fedglm has not tested (fedglm.models.families), a model not in
fp32, and a model whose ONNX file would pass protobuf's 2 GB limit. Each file is written to a
temporary name and renamed (`_written`), with the exporters' advisory output silenced (`_quiet`).
An export takes 15-75 s for the tiny test model and 70-80 s for a 31.6 M-parameter GLM-4 on two
loaded CPU cores.

Parity (`logits_parity`, `cache_parity`) runs a graph in ONNX Runtime and reports, against
torch's fp32 full-sequence logits, the largest absolute logit difference and the next-token
(argmax) agreement, as `check_parity` does for the home-made model. Measured on tiny random
models (hidden 64, 2 layers, vocabulary 300, logits of std 0.16) of all four families: fp32
logits and KV-cache graphs within 4e-7, agreement 1.0; FP16 (`convert_fp16`) within 8e-4,
agreement 1.0; INT8 (`quantize_int8`) 0.13-0.29, agreement 0.73-0.93, large against such flat
logits (a trained byte-level model kept 98.4%, notes/export.md). Both also work on the KV-cache graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from fedglm.errors import InputError
from fedglm.export.onnx import Parity, _quiet, _written
from fedglm.generate import INPUT_IDS, LOGITS, POSITION_IDS, past_names, present_names, session
from fedglm.models.causal import forward_logits
from fedglm.models.families import FAMILIES

MAX_ONNX_BYTES = 2**31 - 2**26  # protobuf's 2 GB limit on one file, less room for the graph


class _LogitsOnly(nn.Module):
    """input_ids -> logits, as fedglm trains: no cache, position ids per sample."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch, seq = input_ids.shape
        positions = torch.arange(seq).unsqueeze(0).expand(batch, seq)
        logits: torch.Tensor = self.model(input_ids=input_ids, position_ids=positions, use_cache=False).logits
        return logits


class _WithCache(nn.Module):
    """One decoding step on plain tensors: the past as a flat list (key, value per layer)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        self.layers = int(model.config.num_hidden_layers)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, past: list[torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.layers)]
        cache = DynamicCache(pairs, config=self.model.config)
        out = self.model(input_ids=input_ids, position_ids=position_ids, cache=cache, use_cache=True)
        present: list[torch.Tensor] = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def _checked(model: PreTrainedModel) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a model fedglm can export; InputError otherwise."""
    name = type(model).__name__
    if name not in FAMILIES:
        hint = " (merge LoRA adapters first: merge_and_unload())" if name.startswith("Peft") else ""
        raise InputError(f"cannot export a {name} to ONNX{hint}; fedglm exports {', '.join(FAMILIES)}")
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise InputError(f"the model is in {dtype}; export an fp32 model (model.float()), then convert_fp16")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if size > MAX_ONNX_BYTES:
        raise InputError(
            f"the model's weights are {size / 2**30:.1f} GiB; one ONNX file holds under 2 GB, "
            "and fedglm does not write external weight files"
        )
    config = model.config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return int(config.num_hidden_layers), kv_heads, head_dim


def _export(
    wrapper: nn.Module,
    args: tuple[Any, ...],
    path: Path,
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: tuple[Any, ...],
) -> None:
    with _quiet(), _written(path) as tmp:
        program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
        if program is None:
            raise RuntimeError("torch.onnx.export returned no program")
        program.save(str(tmp), external_data=False)


def export_logits(model: PreTrainedModel, path: Path, *, max_batch: int) -> None:
    """Export `model` at `path`: `input_ids` (batch 1..max_batch, any length) -> `logits`."""
    from torch.export import Dim

    _checked(model)
    max_seq = int(model.config.max_position_embeddings)
    training = model.training
    model.eval()
    try:
        example = torch.randint(0, int(model.config.vocab_size), (2, min(8, max_seq)))
        batch = Dim("batch", min=1, max=max(2, max_batch))
        seq = Dim("seq", min=1, max=max_seq)
        _export(
            _LogitsOnly(model),
            (example,),
            path,
            input_names=[INPUT_IDS],
            output_names=[LOGITS],
            dynamic_shapes=({0: batch, 1: seq},),
        )
    finally:
        model.train(training)


def export_with_cache(model: PreTrainedModel, path: Path, *, max_batch: int) -> None:
    """Export one decoding step of `model` at `path`: new tokens and the past in, logits and the present out.

    Sliding-window attention (a Qwen2 option) is refused: its cache would drop old positions,
    which this graph does not; export the logits graph for such a model.
    """
    from torch.export import Dim

    layers, kv_heads, head_dim = _checked(model)
    if "sliding_attention" in (getattr(model.config, "layer_types", None) or ()):
        raise InputError(
            "the model has sliding-window attention layers (config.layer_types), whose cache the "
            "KV-cache graph does not model; use export_logits"
        )
    max_seq = int(model.config.max_position_embeddings)
    training = model.training
    model.eval()
    try:
        # More than one new token in the example: with one, sdpa's `is_causal` is traced as a
        # SymBool and the export fails (TypeError). A past of 0 or equal lengths export fine.
        new, old = 3, 4
        ids = torch.randint(0, int(model.config.vocab_size), (2, new))
        positions = (torch.arange(new) + old).expand(2, new)
        past = [torch.zeros(2, kv_heads, old, head_dim) for _ in range(2 * layers)]
        batch = Dim("batch", min=1, max=max(2, max_batch))
        seq = Dim("seq", min=1, max=max_seq)
        past_seq = Dim("past_seq", min=0, max=max_seq)
        _export(
            _WithCache(model),
            (ids, positions, past),
            path,
            input_names=[INPUT_IDS, POSITION_IDS, *past_names(layers)],
            output_names=[LOGITS, *present_names(layers)],
            dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}, [{0: batch, 2: past_seq}] * (2 * layers)),
        )
    finally:
        model.train(training)


def _compare(name: str, pairs: Sequence[tuple[np.ndarray, torch.Tensor]]) -> Parity:
    worst, agree, total = 0.0, 0, 0
    for got, expected in pairs:
        reference = expected.numpy()
        worst = max(worst, float(np.abs(got.astype(np.float32) - reference).max()))
        agree += int((got.argmax(-1) == reference.argmax(-1)).sum())
        total += int(np.prod(reference.shape[:-1]))
    if total == 0:
        raise ValueError("no tokens to check parity on")
    return Parity(variant=name, max_abs_diff=worst, agreement=agree / total, tokens=total)


@torch.no_grad()
def logits_parity(
    model: PreTrainedModel, path: Path, batches: Sequence[torch.Tensor], *, name: str
) -> Parity:
    """A logits graph (fp32, INT8 or FP16) against torch on each (batch, seq) batch of token ids."""
    runner = session(path)
    training = model.training
    model.eval()
    try:
        pairs = [
            (runner.run([LOGITS], {INPUT_IDS: ids.numpy().astype(np.int64)})[0], forward_logits(model, ids))
            for ids in batches
        ]
    finally:
        model.train(training)
    return _compare(name, pairs)


@torch.no_grad()
def cache_parity(
    model: PreTrainedModel, path: Path, tokens: torch.Tensor, *, chunks: Sequence[int], name: str
) -> Parity:
    """A KV-cache graph fed `tokens` (batch, seq) in `chunks` (new tokens per call, the first with an
    empty past), each call's logits against torch's full-sequence logits at the same positions."""
    if sum(chunks) != tokens.shape[1] or min(chunks) < 1:
        raise ValueError(f"chunks {list(chunks)} must be positive and sum to the length {tokens.shape[1]}")
    runner = session(path)
    layers, kv_heads, head_dim = _checked(model)
    training = model.training
    model.eval()
    try:
        expected = forward_logits(model, tokens)
    finally:
        model.train(training)
    batch = tokens.shape[0]
    past = {n: np.zeros((batch, kv_heads, 0, head_dim), np.float32) for n in past_names(layers)}
    pairs: list[tuple[np.ndarray, torch.Tensor]] = []
    start = 0
    for size in chunks:
        ids = tokens[:, start : start + size].numpy().astype(np.int64)
        positions = np.broadcast_to(np.arange(start, start + size, dtype=np.int64), ids.shape).copy()
        logits, *present = runner.run(None, {INPUT_IDS: ids, POSITION_IDS: positions, **past})
        past = dict(zip(past_names(layers), present, strict=True))
        pairs.append((logits, expected[:, start : start + size]))
        start += size
    return _compare(name, pairs)
