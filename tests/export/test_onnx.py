"""The served model's ONNX file, its INT8 and FP16 variants, parity on held-out text (`check_parity`,
`OnnxLM`), lint, and TensorRT. The exports themselves, for every family and with a KV cache, are
tested in test_causal_onnx.py; here one export, of a pruned GLM-4 as export sees it after slicing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from fedglm.corpus import generate_public_records
from fedglm.errors import InputError
from fedglm.export.causal_onnx import export_logits
from fedglm.export.onnx import OnnxLM, check_parity, convert_fp16, quantize_int8
from fedglm.export.tensorrt import build_engine, load_tensorrt
from fedglm.models.base import BaseModel
from fedglm.models.causal import forward_logits
from fedglm.models.lora import wire_state
from fedglm.models.pruning import Mask, choose_mask
from fedglm.models.tokenizer import encode_records
from tests.bases import make_base, tokenizer

SEQ_LEN = 64
RECORDS = encode_records(tokenizer(), generate_public_records(12, seed=3))


@dataclass(frozen=True)
class Exported:
    base: BaseModel
    model: PreTrainedModel  # the base sliced to a mask
    path: Path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """A tiny GLM-4 pruned to one query head per KV group and 132 of 176 channels, exported once."""
    folder = tmp_path_factory.mktemp("onnx")
    base = BaseModel.open(make_base(folder / "base"))
    full = Mask.full(base.shape)
    mask = choose_mask(
        wire_state(base.build(lora=None)), base.shape, base.family, full, heads=0.5, channels=0.25
    )
    model = base.build(lora=None, mask=mask).eval()
    export_logits(model, folder / "model.onnx", max_batch=8)
    return Exported(base, model, folder / "model.onnx")


def test_onnx_matches_torch_at_any_batch_and_length(exported: Exported) -> None:
    model, path = exported.model, exported.path
    assert (model.config.num_attention_heads, model.config.intermediate_size) == (2, 132)  # pruned
    session = OnnxLM(path)
    for shape in ((1, 2), (3, 17), (8, SEQ_LEN)):
        tokens = torch.randint(0, len(tokenizer()), shape, generator=torch.Generator().manual_seed(shape[1]))
        with torch.no_grad():
            torch.testing.assert_close(session(tokens), forward_logits(model, tokens), rtol=1e-4, atol=1e-4)
    parity = check_parity(model, session, "fp32", RECORDS, seq_len=SEQ_LEN, batches=4)
    assert parity.max_abs_diff < 1e-4 and parity.agreement == 1.0 and parity.tokens > 500, parity
    assert not list(path.parent.glob(".*tmp"))  # no temporary file left behind


def test_parity_reports_a_file_of_another_model(exported: Exported) -> None:
    unpruned = exported.base.build(lora=None).eval()
    parity = check_parity(unpruned, OnnxLM(exported.path), "fp32", RECORDS, seq_len=SEQ_LEN, batches=2)
    assert parity.max_abs_diff > 1e-3 and parity.agreement < 1.0, parity


def test_int8_and_fp16_variants_are_smaller_and_agree(exported: Exported, tmp_path: Path) -> None:
    model, path = exported.model, exported.path
    quantize_int8(path, tmp_path / "model.int8.onnx")
    convert_fp16(path, tmp_path / "model.fp16.onnx")
    results = {}
    for name in ("int8", "fp16"):
        variant = tmp_path / f"model.{name}.onnx"
        assert variant.stat().st_size < path.stat().st_size
        results[name] = check_parity(model, OnnxLM(variant), name, RECORDS, seq_len=SEQ_LEN, batches=4)
    # An untrained model's logits are nearly flat, so INT8's agreement is a loose floor; the release
    # reports the measured agreement of a trained model (see bench/serving.py).
    assert 0 < results["int8"].max_abs_diff < 1.0 and results["int8"].agreement > 0.5, results
    assert 0 < results["fp16"].max_abs_diff < 1e-2 and results["fp16"].agreement > 0.95, results


def test_polygraphy_lints_the_exported_model(exported: Exported, tmp_path: Path) -> None:
    polygraphy = shutil.which("polygraphy") or str(Path(sys.executable).parent / "polygraphy")
    report = tmp_path / "lint.json"
    result = subprocess.run(
        [
            polygraphy,
            "check",
            "lint",
            str(exported.path),
            "--input-shapes",
            "input_ids:[2,16]",
            "-o",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads(report.read_text())["summary"]
    assert summary["passing"] and not summary.get("failing")


def _tensorrt_missing() -> str | None:
    try:
        load_tensorrt()
    except InputError as exc:
        return str(exc)
    return None


@pytest.mark.skipif(_tensorrt_missing() is not None, reason=str(_tensorrt_missing()))
def test_tensorrt_engine_builds(exported: Exported, tmp_path: Path) -> None:
    build_engine(exported.path, tmp_path / "model.plan", max_batch=8, max_seq_len=SEQ_LEN)
    assert (tmp_path / "model.plan").stat().st_size > 0


@pytest.mark.skipif(_tensorrt_missing() is None, reason="TensorRT is present here")
def test_without_tensorrt_the_engine_build_is_a_clear_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="export --format onnx"):
        build_engine(tmp_path / "model.onnx", tmp_path / "model.plan", max_batch=1, max_seq_len=8)
    assert not (tmp_path / "model.plan").exists()
