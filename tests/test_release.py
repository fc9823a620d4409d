import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedglm.cli.main import app
from fedglm.config import (
    DistillConfig,
    ExportConfig,
    FederationConfig,
    PublicTextConfig,
    ReleaseConfig,
    RunSpec,
)
from fedglm.errors import CheckFailed
from fedglm.layout import CARD_JSON, CARD_MD, LEDGER_COPIES, RELEASE_DIR, SPEC_NAME, STUDENT_FILE
from fedglm.model import build_model, load_model, save_model
from fedglm.pruning import Mask, choose_mask, slice_state
from fedglm.release import final_model, release, run_export
from fedglm.server.checkpoint import Checkpoint, model_fingerprint, save_checkpoint
from tests.privacy.helpers import ledger_of

FED = FederationConfig.model_validate(
    {
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "max_seq_len": 32},
        "train": {"seq_len": 32},
    }
)
QUICK = ReleaseConfig(
    public_text=PublicTextConfig(generated_records=60),
    distill=DistillConfig(layers=1, steps=20, batch_size=8, seq_len=32),
    export=ExportConfig(parity_batches=2),
)


def make_run(run: Path) -> Mask:
    """A finished run folder as the ServerApp leaves it: spec, pruned checkpoint, metrics, the
    ledger lines it countersigned."""
    args = FED.model.glm_args()
    state = dict(build_model(args, 0).state_dict())
    mask = choose_mask(state, args, Mask.full(args), heads=0.25, channels=0.5)
    run.mkdir(parents=True)
    spec = RunSpec(federation=FED, out_dir=run, resume=True, receipt_key=run / "receipt.key")
    (run / SPEC_NAME).write_text(spec.model_dump_json())
    save_checkpoint(
        run,
        Checkpoint(
            round=3,
            state=slice_state(state, args, Mask.full(args), mask),
            residual={},
            run_key="r",
            fingerprint=model_fingerprint(FED.model.model_dump()),
            mask=mask.to_json(),
        ),
    )
    rows = [
        {"round": r, "upload_bytes": 1000 * r, "download_bytes": 2000, "val_loss": 2.0} for r in (1, 2, 3)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the coordinator's copy of a site's countersigned lines, written by the site's own code path
    site = ledger_of(run.parent / "site", rounds=2)
    (run / LEDGER_COPIES).mkdir()
    shutil.copy(site.ledger, run / LEDGER_COPIES / "site-a.jsonl")
    return mask


def test_final_model_is_the_sliced_checkpoint(tmp_path: Path) -> None:
    mask = make_run(tmp_path / "run")
    model = final_model(tmp_path / "run")
    assert model.args.layer_heads == (3, 3) and model.args.layer_ff == (32, 32)
    assert mask.kept() == (6, 64)


def test_release_distills_exports_and_describes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run)
    files = {p.name for p in release(run, QUICK)}
    assert {
        "teacher.pt",
        STUDENT_FILE,
        "model.onnx",
        "model.int8.onnx",
        "model.fp16.onnx",
        CARD_MD,
        CARD_JSON,
    } <= files
    card = json.loads((run / RELEASE_DIR / CARD_JSON).read_text())
    assert card["architecture"]["configured"]["parameters"] > card["architecture"]["pruned"]["parameters"]
    assert card["architecture"]["student"]["layers"] == 1
    assert card["export"]["parity"]["passed"] is True
    assert card["export"]["files"]["int8"]["next_token_agreement"] > 0.5
    assert card["traffic"] == {"upload_bytes": 6000, "download_bytes": 6000}
    [site] = card["privacy"]["sites"]
    claims = [json.loads(line)["entry"]["epsilon"] for line in (run / LEDGER_COPIES / "site-a.jsonl").open()]
    assert site["epsilon"] == max(claims) and site["delta"] == 1e-5 and site["rounds"] == 2
    assert site["epsilon_replace_one"] is None  # the site's record count is private
    text = (run / RELEASE_DIR / CARD_MD).read_text()
    assert f"site-a | {max(claims):.3f} | 1e-05" in text and "model.int8.onnx" in text
    assert "not one patient" in text and "time a site takes to reply" in text
    student = load_model(run / RELEASE_DIR / STUDENT_FILE)
    assert student.args.n_layers == 1


def test_failing_parity_is_a_failed_check_with_its_report(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run)
    strict = QUICK.model_copy(update={"export": ExportConfig(parity_atol=1e-12, int8=False, fp16=False)})
    with pytest.raises(CheckFailed, match="parity failed"):
        run_export(run, strict, ["onnx"])
    report = json.loads((run / RELEASE_DIR / "export.json").read_text())
    assert report["parity"]["passed"] is False


def test_cli_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "not a run folder" in result.output
    run = tmp_path / "run"
    make_run(run)
    bad = tmp_path / "release.yaml"
    bad.write_text("distill: {layers: 5}\n")
    result = runner.invoke(app, ["distill", str(run), "--config", str(bad)])
    assert result.exit_code == 2 and "distill.layers = 5" in result.output
    result = runner.invoke(app, ["export", str(run), "--format", "tflite"])
    assert result.exit_code == 2 and "choose onnx or tensorrt" in result.output


def test_model_files_round_trip_and_bad_ones_are_input_errors(tmp_path: Path) -> None:
    model = build_model(FED.model.glm_args(), 1)
    save_model(tmp_path / "m.pt", model)
    loaded = load_model(tmp_path / "m.pt")
    tokens = torch.randint(0, 258, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    (tmp_path / "bad.pt").write_bytes(b"junk")
    from fedglm.errors import InputError

    with pytest.raises(InputError, match="not a fedglm model file"):
        load_model(tmp_path / "bad.pt")
