"""ONNX variants, and parity against torch in ONNX Runtime (the export itself:
`causal_onnx.py`, input `input_ids` (int64), output `logits` (fp32)).

- `quantize_int8`: ONNX Runtime's dynamic quantization, INT8 weights per output channel, for CPU
  serving. `convert_fp16`: FP16 weights and compute with fp32 inputs and outputs, for GPUs
  (TensorRT takes its precision from this model).
- `check_parity`: logits of a variant against torch's on windows of held-out text: the largest
  absolute difference, and next-token agreement (the argmax is the same) over real tokens.

Every file is written to a temporary name and renamed, so a failed export leaves no half file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedglm.data import IGNORE_INDEX, eval_windows
from fedglm.models.causal import forward_logits

INPUT_NAME = "input_ids"
OUTPUT_NAME = "logits"


@contextlib.contextmanager
def _written(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, renamed to `path` if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' and quantizer's advisory logging for the block."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch._dynamo", "root", "")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def quantize_int8(source: Path, path: Path) -> None:
    """Dynamic INT8 quantization (weights per output channel, activations at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet(), _written(path) as tmp:
        quantize_dynamic(source, tmp, weight_type=QuantType.QInt8, per_channel=True)


def convert_fp16(source: Path, path: Path) -> None:
    """FP16 weights and compute; inputs and outputs keep their types."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet(), _written(path) as tmp:
        converted = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
        onnx.save(converted, str(tmp))


class OnnxLM(nn.Module):
    """An ONNX model in ONNX Runtime (CPU), called like the torch model: ids -> fp32 logits."""

    def __init__(self, path: Path, *, threads: int = 0) -> None:
        import onnxruntime as ort

        super().__init__()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, use_cache: bool = False
    ) -> torch.Tensor:
        """Logits of `input_ids`; the exported graph computes the positions itself, no cache."""
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: input_ids.cpu().numpy().astype(np.int64)})
        return torch.from_numpy(np.asarray(logits, dtype=np.float32))


@dataclass(frozen=True)
class Parity:
    """A variant against torch: worst logit difference and next-token agreement."""

    variant: str
    max_abs_diff: float
    agreement: float
    tokens: int


@torch.no_grad()
def check_parity(
    model: nn.Module,
    variant: nn.Module,
    name: str,
    records: Sequence[list[int]],
    *,
    seq_len: int,
    batches: int,
) -> Parity:
    """Compare `variant` with `model` (torch, fp32) on up to `batches` batches of 8 windows."""
    model = model.eval().cpu()
    worst, agree, total = 0.0, 0, 0
    windows = eval_windows(records, seq_len=seq_len, batch_size=8)
    for done, (inputs, targets) in enumerate(windows):
        if done == batches:
            break
        expected = forward_logits(model, inputs)
        got = variant(inputs)
        real = targets != IGNORE_INDEX
        worst = max(worst, float((got - expected).abs()[real].max()))
        agree += int((got.argmax(-1) == expected.argmax(-1))[real].sum())
        total += int(real.sum())
    if total == 0:
        raise ValueError("no held-out tokens to check parity on")
    return Parity(variant=name, max_abs_diff=worst, agreement=agree / total, tokens=total)
