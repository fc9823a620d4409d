"""From a run folder to a served model: distill, export, and describe (`<run>/release/`).

Used by `fedglm distill`, `fedglm export`, and by `fedglm server` / `fedglm simulate` after the
last round when their config has a `release` section. Everything reads the run folder
(`run-spec.json`, `checkpoint.pt`: the final global model, already sliced by pruning) and public
text only; nothing here touches a site's records or spends privacy.

Files in `<run>/release/`:
- `teacher/`: the final (pruned) global model, LoRA merged, as a Hugging Face folder with the
  base's tokenizer; `model/`: the served model (the distilled student, else the teacher), the
  same way; `distill.json`: both models' shapes and held-out loss and bits per byte.
- `model.onnx` (fp32), `model.int8.onnx`, `model.fp16.onnx`, `model.plan` (TensorRT);
  `export.json`: which model was exported, each file's size, parity and held-out bits per byte.
- `MODEL_CARD.md` and `model_card.json` (`fedglm/modelcard.py`), rewritten after each step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from fedglm.config import ReleaseConfig
from fedglm.data import text_bytes
from fedglm.distill import distill, make_student
from fedglm.errors import CheckFailed, InputError
from fedglm.export.causal_onnx import export_logits, export_with_cache
from fedglm.export.onnx import OnnxLM, check_parity, convert_fp16, quantize_int8
from fedglm.layout import DISTILL_REPORT, ENGINE_FILE, ONNX_FILES, RELEASE_DIR, SERVED_DIR, TEACHER_DIR
from fedglm.modelcard import read_run_spec, write_card
from fedglm.models.base import BaseModel
from fedglm.models.families import describe
from fedglm.models.folder import load_model, load_tokenizer, save_folder
from fedglm.models.pruning import Mask
from fedglm.models.tokenizer import encode_records
from fedglm.public_text import public_text
from fedglm.reports import DistillReport, ExportedFile, ExportReport, Parity, ScoredModel, write_report
from fedglm.server.selection import released_checkpoint
from fedglm.training import EvalStats, held_out


def run_base(run_dir: Path) -> BaseModel:
    """The run's base folder (the coordinator's copy, named in the run spec)."""
    base = read_run_spec(run_dir).federation.base
    if base is None:
        raise InputError(f"{run_dir}: its run spec names no base model folder")
    return BaseModel.open(base)


def final_model(run_dir: Path) -> PreTrainedModel:
    """The run's last global model, sliced as pruning left it (LoRA adapters merged in)."""
    spec = read_run_spec(run_dir)
    checkpoint = released_checkpoint(run_dir)
    if checkpoint is None:
        raise InputError(f"{run_dir} has no checkpoint: no round has finished yet")
    base = run_base(run_dir)
    fed = spec.federation
    mask = Mask.from_json(checkpoint.mask, base.shape) if checkpoint.mask else Mask.full(base.shape)
    lora = fed.train.lora_spec(fed.model.init_seed, base.family)
    return base.merged(checkpoint.state, mask=mask, lora_scale=lora.scale if lora else None)


def _scores(stats: EvalStats) -> dict[str, Any]:
    return {"loss": stats.loss, "bits_per_byte": stats.bits_per_byte, "tokens": stats.tokens}


def run_distill(run_dir: Path, cfg: ReleaseConfig) -> DistillReport:
    """Distill the run's final model into a student; write both and `distill.json`."""
    if cfg.distill is None:
        raise InputError("the release config has distill: null; set a distill section to distill")
    d = cfg.distill
    folder = run_dir / RELEASE_DIR
    teacher = final_model(run_dir)
    tokenizer = run_base(run_dir).tokenizer()
    n_layers = int(teacher.config.num_hidden_layers)
    layers = d.layers or max(1, n_layers // 2)
    if layers > n_layers:
        raise InputError(f"distill.layers = {layers}: the teacher has only {n_layers} layers")
    text = public_text(cfg.public_text)
    held, held_bytes = encode_records(tokenizer, text.val), text_bytes(text.val)
    student = make_student(teacher, layers=layers, heads=d.heads, channels=d.channels)
    seq_len = min(d.seq_len, int(teacher.config.max_position_embeddings))
    stats = distill(
        teacher,
        student,
        encode_records(tokenizer, text.train),
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
    save_folder(teacher, tokenizer, folder / TEACHER_DIR)
    save_folder(student, tokenizer, folder / SERVED_DIR)
    report = DistillReport(
        public_text=_text_source(cfg),
        held_out_records=len(text.val),
        teacher=ScoredModel(**describe(teacher), **_scores(held_out(teacher, held, seq_len, held_bytes))),
        student=ScoredModel(**describe(student), **_scores(held_out(student, held, seq_len, held_bytes))),
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


def served_model(run_dir: Path) -> tuple[str, PreTrainedModel]:
    """What export serves: the student if there is one, else the final (pruned) model, which
    is then written as the served folder too."""
    folder = run_dir / RELEASE_DIR
    if (folder / DISTILL_REPORT).exists() and (folder / SERVED_DIR).is_dir():
        return "student", load_model(folder / SERVED_DIR).eval()
    model = final_model(run_dir)
    save_folder(model, run_base(run_dir).tokenizer(), folder / SERVED_DIR)
    return "pruned global model", model


def run_export(run_dir: Path, cfg: ReleaseConfig, formats: list[str]) -> ExportReport:
    """Export the served model; parity of the fp32 ONNX model must hold (else `CheckFailed`)."""
    from fedglm.export.tensorrt import build_engine, load_tensorrt

    e = cfg.export
    if "tensorrt" in formats:
        load_tensorrt()  # fail before the long steps where TensorRT cannot run
    folder = run_dir / RELEASE_DIR
    which, model = served_model(run_dir)
    text = public_text(cfg.public_text)
    records = encode_records(load_tokenizer(folder / SERVED_DIR), text.val)
    n_bytes = text_bytes(text.val)
    seq_len = min(cfg.export.seq_len, int(model.config.max_position_embeddings))
    fp32 = folder / ONNX_FILES["fp32"]
    export_logits(model, fp32, max_batch=e.max_batch)
    export_with_cache(model, folder / ONNX_FILES["cache"], max_batch=e.max_batch)  # for fedglm generate
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
            held_out_bits_per_byte=held_out(session, records, seq_len, n_bytes).bits_per_byte,
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
        parameters=sum(p.numel() for p in model.parameters()),
        torch_held_out_bits_per_byte=held_out(model, records, seq_len, n_bytes).bits_per_byte,
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
