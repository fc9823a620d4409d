"""From a finished run folder to the release: the final (pruned) model, distillation, ONNX export
with parity, and the model card.

The release pipeline (distillation, then two ONNX exports of 30-60 s each) runs once per session
(`released_run`, shared with tests/cli/test_generate_cli.py); the other tests read it or copy it.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from fedglm.cli.main import app
from fedglm.config import (
    DistillConfig,
    ExportConfig,
    FederationConfig,
    PretrainConfig,
    PublicTextConfig,
    ReleaseConfig,
    RunSpec,
    SelectionConfig,
)
from fedglm.errors import CheckFailed, InputError
from fedglm.export.causal_onnx import cache_parity
from fedglm.export.tensorrt import load_tensorrt
from fedglm.layout import (
    BASE_MODEL_DIR,
    BEST_CHECKPOINT,
    CARD_JSON,
    CARD_MD,
    CHECKPOINT_NAME,
    DISTILL_REPORT,
    EXPORT_REPORT,
    LEDGER_COPIES,
    MANIFEST_FILE,
    ONNX_FILES,
    RELEASE_DIR,
    SERVED_DIR,
    SPEC_NAME,
    TEACHER_DIR,
)
from fedglm.modelcard import build_card, render_markdown, write_card
from fedglm.models.base import BaseModel
from fedglm.models.causal import forward_logits
from fedglm.models.folder import TOKENIZER, WEIGHTS
from fedglm.models.lora import is_adapter, is_trained_adapter, wire_state
from fedglm.models.pruning import Mask, choose_mask, slice_state
from fedglm.models.tokenizer import encode_records
from fedglm.pretrain import pretrain, read_base_manifest
from fedglm.public_text import public_text
from fedglm.release import final_model, release, run_export
from fedglm.server.checkpoint import Checkpoint, load_checkpoint, model_fingerprint, save_checkpoint
from tests.privacy.helpers import ledger_of

QUICK = ReleaseConfig(
    public_text=PublicTextConfig(generated_records=60),
    distill=DistillConfig(layers=1, steps=20, batch_size=8, seq_len=32),
    export=ExportConfig(parity_batches=2),
)


def federation(base: Path, **train: object) -> FederationConfig:
    return FederationConfig.model_validate({"base": base, "train": {"seq_len": 32, **train}})


def make_run(run: Path, base_folder: Path, *, lora: bool = False) -> Mask:
    """A finished run folder as the ServerApp leaves it: spec, the base's manifest (if it has one),
    a pruned checkpoint (of trained LoRA adapters with `lora`), metrics, the ledger lines it
    countersigned."""
    fed = federation(base_folder, adapters="lora" if lora else "full")
    base = BaseModel.open(base_folder)
    spec = fed.train.lora_spec(fed.model.init_seed, base.family)
    full = Mask.full(base.shape)
    mask = choose_mask(
        wire_state(base.build(lora=None)), base.shape, base.family, full, heads=0.5, channels=0.5
    )
    state = slice_state(wire_state(base.build(lora=spec)), base.shape, base.family, full, mask)
    generator = torch.Generator().manual_seed(3)
    for name in [n for n in state if is_trained_adapter(n)]:  # as if the sites had trained B
        state[name] = 0.1 * torch.randn(state[name].shape, generator=generator)
    run.mkdir(parents=True)
    run_spec = RunSpec(federation=fed, out_dir=run, resume=True, receipt_key=run / "receipt.key")
    (run / SPEC_NAME).write_text(run_spec.model_dump_json())
    manifest = read_base_manifest(base_folder)
    if manifest is not None:
        (run / MANIFEST_FILE).write_text(json.dumps(manifest))
    save_checkpoint(
        run,
        Checkpoint(
            round=3,
            state=state,
            residual={},
            run_key="r",
            fingerprint=model_fingerprint(fed.model.model_dump(), base=base.hash, lora=spec),
            mask=mask.to_json(),
        ),
    )
    rows = [
        {"round": r, "upload_bytes": 1000 * r, "download_bytes": 2000, "val_loss": 2.0} for r in (1, 2, 3)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the coordinator's copy of a site's countersigned lines, written by the site's own code path
    site = ledger_of(run.parent / f"{run.name}-site", rounds=2)
    (run / LEDGER_COPIES).mkdir()
    shutil.copy(site.ledger, run / LEDGER_COPIES / "site-a.jsonl")
    return mask


def pretrained_base(out: Path, records: int = 40) -> Path:
    """A base folder made by `fedglm pretrain` (tiny GLM-4, one step), with its manifest."""
    settings = {
        "model": {"preset": "tiny", "vocab_size": 300},
        "generated_records": records,
        "steps": 1,
        "batch_size": 2,
        "seq_len": 32,
        "precision": "fp32",
        "out_dir": out,
    }
    pretrain(PretrainConfig.model_validate(settings))
    return out / BASE_MODEL_DIR


@functools.cache
def released_run(basetemp: Path) -> Path:
    """A run on a pretrained tiny GLM-4 base, released with `QUICK`: once per session."""
    root = basetemp / "released"
    make_run(root / "run", pretrained_base(root / "pretrain"))
    release(root / "run", QUICK)
    return root / "run"


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return released_run(tmp_path_factory.getbasetemp())


def tokens(run: Path) -> torch.Tensor:
    """Two windows of held-out public text in the base's tokens."""
    tokenizer = BaseModel.open(folder_of_base(run)).tokenizer()
    records = encode_records(tokenizer, public_text(QUICK.public_text).val[:2])
    length = min(len(r) for r in records)
    return torch.tensor([r[:length] for r in records])


def federation_of(run: Path) -> FederationConfig:
    return RunSpec.model_validate_json((run / SPEC_NAME).read_text()).federation


def folder_of_base(run: Path) -> Path:
    base = federation_of(run).base
    assert base is not None
    return base


def test_final_model_is_the_sliced_checkpoint(tmp_path: Path, tiny_base: Path) -> None:
    mask = make_run(tmp_path / "run", tiny_base)
    model = final_model(tmp_path / "run")
    assert mask.kept() == (2, 88)  # one query head in each of the 2 KV groups, half the channels
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 2)
    assert model.config.intermediate_size == 88 and type(model).__name__ == "Glm4ForCausalLM"
    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint is not None
    state = wire_state(model)
    assert state.keys() == checkpoint.state.keys()
    assert all(torch.equal(state[name], checkpoint.state[name]) for name in state)


def test_with_selection_the_release_takes_the_best_round_and_the_card_says_so(
    tmp_path: Path, tiny_base: Path
) -> None:
    run = tmp_path / "run"
    make_run(run, tiny_base)
    spec = RunSpec.model_validate_json((run / SPEC_NAME).read_text())
    selection = {"metric": "val_loss", "min_delta": 0.01, "patience": 1}
    fed = spec.federation.model_copy(update={"selection": SelectionConfig.model_validate(selection)})
    (run / SPEC_NAME).write_text(spec.model_copy(update={"federation": fed}).model_dump_json())
    rows = [{"round": 1, "val_loss": 2.0}, {"round": 2, "val_loss": 1.5}, {"round": 3, "val_loss": 1.6}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    last = load_checkpoint(run)
    assert last is not None
    best_state = {name: value + 0.5 for name, value in last.state.items()}
    best = Checkpoint(
        round=2, state=best_state, residual={}, run_key="r", fingerprint=last.fingerprint, mask=last.mask
    )
    save_checkpoint(run, best)
    (run / BEST_CHECKPOINT).write_bytes((run / CHECKPOINT_NAME).read_bytes())
    save_checkpoint(run, last)  # checkpoint.pt is round 3 again; best.pt holds round 2

    state = wire_state(final_model(run))
    assert all(torch.equal(state[name], best_state[name]) for name in state)
    card = build_card(run)
    assert card["federation"]["released_round"] == 2 and card["federation"]["rounds_finished"] == 3
    assert card["federation"]["selected_by"]["best_value"] == 1.5
    text = render_markdown(card)
    assert "Released: the model of round 2 (round 0 is the base), the lowest val_loss (1.5000" in text


def test_final_model_merges_the_lora_adapters(tmp_path: Path, tiny_base: Path) -> None:
    mask = make_run(tmp_path / "run", tiny_base, lora=True)
    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint is not None and any(is_adapter(name) for name in checkpoint.state)
    base = BaseModel.open(tiny_base)
    spec = federation_of(tmp_path / "run").train.lora_spec(0, base.family)
    adapted = base.empty(lora=spec, mask=mask, state=checkpoint.state).eval()

    model = final_model(tmp_path / "run")

    assert not any(is_adapter(name) for name in wire_state(model))
    ids = tokens(tmp_path / "run")
    with torch.no_grad():
        merged, expected = forward_logits(model, ids), forward_logits(adapted, ids)
        plain = forward_logits(base.empty(lora=None, mask=mask, state=without_adapters(checkpoint)), ids)
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)
    assert (merged - plain).abs().max() > 1e-3  # the adapters change the model


def without_adapters(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    return {name: t for name, t in checkpoint.state.items() if not is_adapter(name)}


def test_release_distills_exports_and_describes(released: Path) -> None:
    run, folder = released, released / RELEASE_DIR
    files = {p.name for p in folder.iterdir() if p.is_file()}
    assert {
        *ONNX_FILES.values(),
        DISTILL_REPORT,
        EXPORT_REPORT,
        CARD_MD,
        CARD_JSON,
    } <= files
    assert (folder / TEACHER_DIR).is_dir() and (folder / SERVED_DIR).is_dir()
    card = json.loads((folder / CARD_JSON).read_text())
    base = BaseModel.open(folder_of_base(run))
    manifest = read_base_manifest(base.folder)
    assert manifest is not None
    assert "Glm4ForCausalLM" in card["model"]
    assert card["base_model"]["path"] == str(base.folder)
    assert card["base_model"]["hash"] == manifest["folder_hash"] == base.hash
    assert card["base_model"]["public_data_only"] is True and card["base_model"]["steps"] == 1
    assert card["base_model"]["inputs"] == manifest["inputs"]
    architecture = card["architecture"]
    assert architecture["configured"]["architecture"] == architecture["pruned"]["architecture"]
    assert architecture["configured"]["architecture"] == "Glm4ForCausalLM"
    assert architecture["configured"]["parameters"] == base.parameters
    assert architecture["configured"]["parameters"] > architecture["pruned"]["parameters"]
    assert architecture["pruned"]["heads"] == [2, 2] and architecture["pruned"]["ffn_channels"] == [88, 88]
    assert architecture["student"]["layers"] == 1
    assert card["export"]["model"] == "student" and card["export"]["parity"]["passed"] is True
    assert card["export"]["files"]["fp32"]["max_abs_logit_diff"] < 1e-4
    assert card["export"]["files"]["int8"]["next_token_agreement"] > 0.5
    assert card["traffic"] == {"upload_bytes": 6000, "download_bytes": 6000}
    [site] = card["privacy"]["sites"]
    claims = [json.loads(line)["entry"]["epsilon"] for line in (run / LEDGER_COPIES / "site-a.jsonl").open()]
    assert site["epsilon"] == max(claims) and site["delta"] == 1e-5 and site["rounds"] == 2
    assert site["epsilon_replace_one"] is None  # the site's record count is private
    text = (folder / CARD_MD).read_text()
    assert f"site-a | {max(claims):.3f} | 1e-05" in text and "model.int8.onnx" in text
    assert "not one patient" in text and "time a site takes to reply" in text
    assert f"Hash {base.hash}; pretrained for 1 steps on public text only" in text
    assert "generated public notes (40 records)" in text


def test_the_released_folders_are_standard_and_share_the_bases_tokenizer(released: Path) -> None:
    folder, base_folder = released / RELEASE_DIR, folder_of_base(released)
    teacher = AutoModelForCausalLM.from_pretrained(folder / TEACHER_DIR, local_files_only=True)
    student = AutoModelForCausalLM.from_pretrained(folder / SERVED_DIR, local_files_only=True)
    assert type(teacher).__name__ == type(student).__name__ == "Glm4ForCausalLM"
    assert (teacher.config.num_hidden_layers, student.config.num_hidden_layers) == (2, 1)
    for model_folder in (folder / TEACHER_DIR, folder / SERVED_DIR):
        assert (model_folder / TOKENIZER).read_bytes() == (base_folder / TOKENIZER).read_bytes()
        tokenizer = AutoTokenizer.from_pretrained(model_folder, local_files_only=True)
        assert len(tokenizer) == student.config.vocab_size == teacher.config.vocab_size
    ids = tokens(released)
    with torch.no_grad():
        assert torch.equal(forward_logits(teacher, ids), forward_logits(final_model(released), ids))
    # the KV-cache graph (for fedglm generate) gives the served model's logits, chunk by chunk
    chunks = [4, 1, ids.shape[1] - 5]
    parity = cache_parity(student, folder / ONNX_FILES["cache"], ids, chunks=chunks, name="kv")
    assert parity.max_abs_diff < 1e-4 and parity.agreement == 1.0, parity


def test_the_card_of_a_base_without_a_manifest_names_its_folder_and_hash(
    tmp_path: Path, tiny_base: Path
) -> None:
    make_run(tmp_path / "run", tiny_base)  # a base folder from elsewhere: no fedglm pretrain manifest

    write_card(tmp_path / "run")

    card = json.loads((tmp_path / "run" / RELEASE_DIR / CARD_JSON).read_text())
    base = BaseModel.open(tiny_base)
    assert card["base_model"] == {
        "path": str(tiny_base),
        "hash": base.hash,
        "manifest": "none (not made by fedglm pretrain)",
    }
    assert card["architecture"]["configured"]["parameters"] == base.parameters
    assert card["architecture"]["student"] is None and card["export"] is None
    text = (tmp_path / "run" / RELEASE_DIR / CARD_MD).read_text()
    assert str(tiny_base) in text and base.hash in text


def test_failing_parity_is_a_failed_check_with_its_report(
    released: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    shutil.copytree(released, run)

    # the served model is the shared release's student: its graphs are the files that release
    # exported (an export takes 30-60 s), copied instead of exported again
    def copy_export(name: str) -> Callable[..., None]:
        def export(model: object, path: Path, *, max_batch: int) -> None:
            shutil.copy(released / RELEASE_DIR / ONNX_FILES[name], path)

        return export

    monkeypatch.setattr("fedglm.release.export_logits", copy_export("fp32"))
    monkeypatch.setattr("fedglm.release.export_with_cache", copy_export("cache"))
    strict = QUICK.model_copy(update={"export": ExportConfig(parity_atol=1e-12, int8=False, fp16=False)})
    with pytest.raises(CheckFailed, match="parity failed"):
        run_export(run, strict, ["onnx"])
    report = json.loads((run / RELEASE_DIR / EXPORT_REPORT).read_text())
    assert report["parity"]["passed"] is False and set(report["files"]) == {"fp32"}
    assert 0 < report["files"]["fp32"]["max_abs_logit_diff"] < 1e-4  # fine, but not within 1e-12
    card = json.loads((run / RELEASE_DIR / CARD_JSON).read_text())
    assert card["export"]["parity"]["passed"] is False


def test_cli_exit_codes(tmp_path: Path, tiny_base: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "not a run folder" in result.output
    run = tmp_path / "run"
    make_run(run, tiny_base)
    bad = tmp_path / "release.yaml"
    bad.write_text("distill: {layers: 5}\n")
    result = runner.invoke(app, ["distill", str(run), "--config", str(bad)])
    assert result.exit_code == 2 and "distill.layers = 5" in result.output
    result = runner.invoke(app, ["export", str(run), "--format", "tflite"])
    assert result.exit_code == 2 and "choose onnx or tensorrt" in result.output
    try:
        load_tensorrt()
    except InputError:  # refused before the long steps, naming the way out
        result = runner.invoke(app, ["export", str(run), "--format", "tensorrt"])
        assert result.exit_code == 2 and "export --format onnx" in result.output
        assert not (run / RELEASE_DIR / ONNX_FILES["fp32"]).exists()


def test_a_damaged_served_folder_is_an_input_error(released: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(released, run, ignore=shutil.ignore_patterns("*.onnx"))
    weights = run / RELEASE_DIR / SERVED_DIR / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])

    result = CliRunner().invoke(app, ["export", str(run)])

    assert result.exit_code == 2, result.output
    assert f"{run / RELEASE_DIR / SERVED_DIR}: cannot load the model" in result.output
    assert not (run / RELEASE_DIR / ONNX_FILES["fp32"]).exists()
