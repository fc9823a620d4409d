"""From a run folder to a served model: distill, export, and describe (`<run>/release/`).

Used by `fedglm distill`, `fedglm export`, and by `fedglm server` / `fedglm simulate` after the
last round when their config has a `release` section. Everything reads the run folder
(`run-spec.json`, `checkpoint.pt`: the final global model, already sliced by pruning) and public
text only; nothing here touches a site's records or spends privacy.

Files in `<run>/release/`:
- `teacher.pt`: the final (pruned) global model; `student.pt`: the distilled student;
  `distill.json`: both models' shapes and held-out loss and bits per byte.
- `model.onnx` (fp32), `model.int8.onnx`, `model.fp16.onnx`, `model.plan` (TensorRT);
  `export.json`: which model was exported, each file's size, parity and held-out bits per byte.
- `MODEL_CARD.md` and `model_card.json` (`fedglm/modelcard.py`), rewritten after each step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedglm.config import ReleaseConfig
from fedglm.corpus import generate_public_records
from fedglm.data import SiteData, encode, load_records, split_records
from fedglm.distill import distill, make_student
from fedglm.errors import CheckFailed, InputError
from fedglm.export.onnx import OnnxLM, check_parity, convert_fp16, export_onnx, quantize_int8
from fedglm.layout import (
    ENGINE_FILE,
    ONNX_FILES,
    RELEASE_DIR,
    STUDENT_FILE,
    TEACHER_FILE,
)
from fedglm.lora import merge_adapters
from fedglm.model import GLM, count_parameters, describe, load_model, save_model
from fedglm.modelcard import read_run_spec, write_card
from fedglm.pruning import Mask
from fedglm.reports import DistillReport, ExportedFile, ExportReport, Parity, ScoredModel, write_report
from fedglm.server.checkpoint import load_checkpoint
from fedglm.training import EvalStats, evaluate


def final_model(run_dir: Path) -> GLM:
    """The run's last global model, sliced as pruning left it (LoRA adapters merged in)."""
    spec = read_run_spec(run_dir)
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is None:
        raise InputError(f"{run_dir} has no checkpoint: no round has finished yet")
    fed = spec.federation
    args = fed.model.glm_args()
    mask = Mask.from_json(checkpoint.mask, args) if checkpoint.mask else Mask.full(args)
    lora = fed.train.lora_spec(fed.model.init_seed)
    model = GLM(mask.shape(args))
    model.load_state_dict(checkpoint.state if lora is None else merge_adapters(checkpoint.state, lora.scale))
    return model.eval()


def public_text(cfg: ReleaseConfig) -> SiteData:
    """The configured public text (or generated notes), split into training and held-out."""
    source = cfg.public_text
    if source.data is None:
        records = generate_public_records(source.generated_records, source.seed)
        return split_records(records, 0.1, source.seed)
    records = [r for r in load_records(source.data.path, source.data.format, source.data.field) if r.strip()]
    if len(records) < 2:
        raise InputError(f"{source.data.path}: fewer than 2 non-empty records of public text")
    return split_records(records, source.data.val_fraction, source.data.split_seed)


def held_out(model: torch.nn.Module, records: list[list[int]], seq_len: int) -> EvalStats:
    """Loss and bits per byte of `model` (torch or `OnnxLM`) on `records`, fp32 on the CPU."""
    return evaluate(
        model,
        records,
        seq_len=seq_len,
        batch_size=16,
        precision="fp32",
        device=torch.device("cpu"),
    )


def _scores(stats: EvalStats) -> dict[str, Any]:
    return {"loss": stats.loss, "bits_per_byte": stats.bits_per_byte, "tokens": stats.tokens}


def run_distill(run_dir: Path, cfg: ReleaseConfig) -> DistillReport:
    """Distill the run's final model into a student; write both and `distill.json`."""
    if cfg.distill is None:
        raise InputError("the release config has distill: null; set a distill section to distill")
    d = cfg.distill
    folder = run_dir / RELEASE_DIR
    teacher = final_model(run_dir)
    layers = d.layers or max(1, teacher.args.n_layers // 2)
    if layers > teacher.args.n_layers:
        raise InputError(f"distill.layers = {layers}: the teacher has only {teacher.args.n_layers} layers")
    text = public_text(cfg)
    held = [encode(t) for t in text.val]
    student = make_student(teacher, layers=layers, heads=d.heads, channels=d.channels)
    seq_len = min(d.seq_len, teacher.args.max_seq_len)
    stats = distill(
        teacher,
        student,
        [encode(t) for t in text.train],
        steps=d.steps,
        batch_size=d.batch_size,
        seq_len=seq_len,
        lr=d.lr,
        temperature=d.temperature,
        alpha=d.alpha,
        precision="fp32",
        device=torch.device("cpu"),
        seed=d.seed,
    )
    save_model(folder / TEACHER_FILE, teacher)
    save_model(folder / STUDENT_FILE, student)
    report = DistillReport(
        public_text=_text_source(cfg),
        held_out_records=len(text.val),
        teacher=ScoredModel(**describe(teacher), **_scores(held_out(teacher, held, seq_len))),
        student=ScoredModel(**describe(student), **_scores(held_out(student, held, seq_len))),
        settings=d.model_dump(),
        final_loss=stats.loss,
        seconds=round(stats.seconds, 2),
    )
    write_report(folder, report)
    write_card(run_dir)
    return report


def _text_source(cfg: ReleaseConfig) -> str:
    data, source = cfg.public_text.data, cfg.public_text
    if data is None:
        return f"generated clinical-style notes ({source.generated_records}, seed {source.seed})"
    return f"{data.path}" + (f" ({data.field})" if data.field else "")


def served_model(run_dir: Path) -> tuple[str, GLM]:
    """What export serves: the student if there is one, else the final (pruned) model."""
    folder = run_dir / RELEASE_DIR
    if (folder / STUDENT_FILE).exists():
        return "student", load_model(folder / STUDENT_FILE)
    return "pruned global model", final_model(run_dir)


def run_export(run_dir: Path, cfg: ReleaseConfig, formats: list[str]) -> ExportReport:
    """Export the served model; parity of the fp32 ONNX model must hold (else `CheckFailed`)."""
    from fedglm.export.tensorrt import build_engine, load_tensorrt

    e = cfg.export
    if "tensorrt" in formats:
        load_tensorrt()  # fail before the long steps where TensorRT cannot run
    folder = run_dir / RELEASE_DIR
    which, model = served_model(run_dir)
    text = public_text(cfg)
    records = [encode(t) for t in text.val]
    seq_len = model.args.max_seq_len
    fp32 = folder / ONNX_FILES["fp32"]
    export_onnx(model, fp32, max_batch=e.max_batch)
    variants = {"fp32": fp32}
    if e.int8:
        quantize_int8(fp32, folder / ONNX_FILES["int8"])
        variants["int8"] = folder / ONNX_FILES["int8"]
    if e.fp16:
        convert_fp16(fp32, folder / ONNX_FILES["fp16"])
        variants["fp16"] = folder / ONNX_FILES["fp16"]
    files: dict[str, ExportedFile] = {}
    for name, path in variants.items():
        session = OnnxLM(path)
        parity = check_parity(model, session, name, records, seq_len=seq_len, batches=e.parity_batches)
        files[name] = ExportedFile(
            file=path.name,
            bytes=path.stat().st_size,
            max_abs_logit_diff=parity.max_abs_diff,
            next_token_agreement=parity.agreement,
            parity_tokens=parity.tokens,
            held_out_bits_per_byte=held_out(session, records, seq_len).bits_per_byte,
        )
    reference = files["fp32"]
    assert reference.max_abs_logit_diff is not None and reference.next_token_agreement is not None
    passed = (
        reference.max_abs_logit_diff <= e.parity_atol and reference.next_token_agreement >= e.parity_agreement
    )
    if "tensorrt" in formats:
        source = variants.get("fp16", fp32)
        build_engine(source, folder / ENGINE_FILE, max_batch=e.max_batch, max_seq_len=seq_len)
        files["tensorrt"] = ExportedFile(
            file=ENGINE_FILE, bytes=(folder / ENGINE_FILE).stat().st_size, built_from=source.name
        )
    report = ExportReport(
        model=which,
        parameters=count_parameters(model),
        torch_held_out_bits_per_byte=held_out(model, records, seq_len).bits_per_byte,
        files=files,
        parity=Parity(atol=e.parity_atol, min_agreement=e.parity_agreement, passed=passed),
    )
    path = write_report(folder, report)
    write_card(run_dir)
    if not passed:
        raise CheckFailed(
            f"ONNX parity failed: max |logit diff| {reference.max_abs_logit_diff:.2e} "
            f"(limit {e.parity_atol:g}), next-token agreement {reference.next_token_agreement:.4f} "
            f"(at least {e.parity_agreement:g}); see {path}"
        )
    return report


def release(run_dir: Path, cfg: ReleaseConfig) -> list[Path]:
    """Distill (if configured), export, write the card; the files of `<run>/release/`."""
    if cfg.distill is not None:
        run_distill(run_dir, cfg)
    run_export(run_dir, cfg, list(cfg.export.formats))  # both steps rewrite the card
    return sorted(p for p in (run_dir / RELEASE_DIR).iterdir() if p.is_file() and not p.name.startswith("."))
