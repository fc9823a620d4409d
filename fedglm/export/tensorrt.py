"""A TensorRT engine from the exported ONNX model, where TensorRT and a GPU are present.

TensorRT comes from NVIDIA's package index with its own native libraries; it is an optional
extra (`pip install fedglm[tensorrt]`) imported only here, only when asked for. Without it, or
without a CUDA GPU, `build_engine` raises an `InputError` that says so (exit 2).

The network is strongly typed (TensorRT 11 makes every network so and removed the FP16/INT8
builder flags; 10.x is asked for it), so the engine's precision is the ONNX model's: build from
the FP16 ONNX variant for an FP16 engine. One optimization profile covers the dynamic axes:
batch 1..`max_batch`, sequence 2..`max_seq_len`, tuned for (`opt_batch`, `opt_seq`).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from fedglm.atomic import atomic_write
from fedglm.errors import CheckFailed, InputError
from fedglm.export.onnx import INPUT_NAME


def load_tensorrt() -> Any:
    """The `tensorrt` module; `InputError` where it or a GPU is missing."""
    try:
        trt = importlib.import_module("tensorrt")
    except (ImportError, OSError) as exc:
        raise InputError(
            f"TensorRT is not available here ({type(exc).__name__}: {exc}); install it from "
            "NVIDIA's index on a machine with a CUDA GPU (pip install fedglm[tensorrt]), or "
            "export --format onnx"
        ) from None
    if not torch.cuda.is_available():
        raise InputError("TensorRT needs a CUDA GPU and none is visible here; export --format onnx")
    return trt


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    max_batch: int,
    max_seq_len: int,
    opt_batch: int = 1,
    opt_seq: int = 128,
) -> None:
    """Parse `onnx_path` and write a serialized engine to `engine_path`."""
    trt = load_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(str(trt.__version__).split(".")[0])
    flags = 0 if major >= 11 else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CheckFailed(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    opt = (min(opt_batch, max_batch), min(opt_seq, max_seq_len))
    profile.set_shape(INPUT_NAME, (1, 2), opt, (max_batch, max_seq_len))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CheckFailed(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    atomic_write(engine_path, lambda handle: handle.write(bytes(serialized)))
