import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedglm.corpus import generate_public_records
from fedglm.data import encode
from fedglm.errors import InputError
from fedglm.export.onnx import OnnxLM, check_parity, convert_fp16, export_onnx, quantize_int8
from fedglm.export.tensorrt import build_engine, load_tensorrt
from fedglm.model import GLMArgs, build_model

# A pruned shape (layers of different widths), as export sees it after slicing.
ARGS = GLMArgs(
    d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64, layer_heads=(3, 2), layer_ff=(40, 64)
)
RECORDS = [encode(t) for t in generate_public_records(12, seed=3)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = build_model(ARGS, 0).eval()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(model, path, max_batch=8)
    return model, path


def test_onnx_matches_torch_at_any_batch_and_length(exported: tuple[torch.nn.Module, Path]) -> None:
    model, path = exported
    session = OnnxLM(path)
    for shape in ((1, 2), (3, 17), (8, 64)):
        tokens = torch.randint(0, 258, shape, generator=torch.Generator().manual_seed(shape[1]))
        with torch.no_grad():
            torch.testing.assert_close(session(tokens), model(tokens), rtol=1e-4, atol=1e-4)
    parity = check_parity(model, session, "fp32", RECORDS, seq_len=64, batches=4)  # type: ignore[arg-type]
    assert parity.max_abs_diff < 1e-4 and parity.agreement == 1.0 and parity.tokens > 500
    assert not list(path.parent.glob(".*tmp"))  # no temporary file left behind


def test_int8_and_fp16_variants_are_smaller_and_agree(
    exported: tuple[torch.nn.Module, Path], tmp_path: Path
) -> None:
    model, path = exported
    quantize_int8(path, tmp_path / "model.int8.onnx")
    convert_fp16(path, tmp_path / "model.fp16.onnx")
    for name in ("int8", "fp16"):
        variant = tmp_path / f"model.{name}.onnx"
        assert variant.stat().st_size < path.stat().st_size
        parity = check_parity(model, OnnxLM(variant), name, RECORDS, seq_len=64, batches=4)  # type: ignore[arg-type]
        # An untrained model's logits are nearly flat, so this is a loose floor; the release
        # reports the measured agreement of a trained model (see bench/serving.py).
        assert parity.agreement > 0.5, parity
        assert parity.max_abs_diff > 0.0


def test_polygraphy_lints_the_exported_model(exported: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    polygraphy = shutil.which("polygraphy") or str(Path(sys.executable).parent / "polygraphy")
    report = tmp_path / "lint.json"
    _, path = exported
    result = subprocess.run(
        [polygraphy, "check", "lint", str(path), "--input-shapes", "input_ids:[2,16]", "-o", str(report)],
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
def test_tensorrt_engine_builds(exported: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    _, path = exported
    build_engine(path, tmp_path / "model.plan", max_batch=8, max_seq_len=64)
    assert (tmp_path / "model.plan").stat().st_size > 0


@pytest.mark.skipif(_tensorrt_missing() is None, reason="TensorRT is present here")
def test_without_tensorrt_the_engine_build_is_a_clear_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="export --format onnx"):
        build_engine(tmp_path / "model.onnx", tmp_path / "model.plan", max_batch=1, max_seq_len=8)
    assert not (tmp_path / "model.plan").exists()
