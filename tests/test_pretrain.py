"""`fedglm pretrain`: resumable to the same result, a checked manifest, and the base's shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedglm.config import DataConfig, FederationConfig, ModelConfig, PretrainConfig
from fedglm.errors import InputError
from fedglm.layout import BASE_FILE, MANIFEST_FILE
from fedglm.model import load_model, save_model
from fedglm.pretrain import OtherConfigState, federation_from_base, file_digest, load_base, pretrain

SMALL = {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 48, "max_seq_len": 64}


def config(out: Path, **overrides: object) -> PretrainConfig:
    settings: dict[str, object] = {
        "model": SMALL,
        "generated_records": 60,
        "steps": 6,
        "batch_size": 4,
        "seq_len": 32,
        "warmup_steps": 2,
        "checkpoint_every": 3,
        "precision": "fp32",
        "out_dir": out,
        **overrides,
    }
    return PretrainConfig.model_validate(settings)


class Stop(Exception):
    pass


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path: Path) -> None:
    whole = pretrain(config(tmp_path / "whole"))

    def stop_after_checkpoint(step: int, loss: float) -> None:
        if step == 5:  # after the state of step 3 was saved, before the one of step 6
            raise Stop

    with pytest.raises(Stop):
        pretrain(config(tmp_path / "cut"), on_step=stop_after_checkpoint)
    assert not (tmp_path / "cut" / BASE_FILE).exists()
    steps: list[int] = []
    resumed = pretrain(config(tmp_path / "cut"), on_step=lambda step, loss: steps.append(step))
    assert steps == [4, 5, 6]
    assert resumed["model_hash"] == whole["model_hash"]
    a, b = load_model(tmp_path / "whole" / BASE_FILE), load_model(tmp_path / "cut" / BASE_FILE)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert resumed["history"] == whole["history"]


def test_the_manifest_records_inputs_steps_and_the_hash(tmp_path: Path) -> None:
    text = tmp_path / "public.jsonl"
    text.write_text(
        "".join(json.dumps({"answer": f"public answer number {i}. " * 3}) + "\n" for i in range(40))
    )
    cfg = config(tmp_path / "out", text=[DataConfig(path=text, field="answer")])
    manifest = pretrain(cfg)
    written = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())
    assert written == manifest
    assert manifest["inputs"] == [
        {"path": str(text), "format": "jsonl", "field": "answer", "sha256": file_digest(text), "records": 40}
    ]
    assert manifest["steps"] == 6 and manifest["public_data_only"] is True
    assert manifest["final"]["val_loss"] > 0 and len(manifest["history"]) == 2
    base = load_base(tmp_path / "out")
    assert base.hash == manifest["model_hash"] and base.model_config.d_model == 32


def test_a_state_saved_under_another_config_is_refused(tmp_path: Path) -> None:
    pretrain(config(tmp_path, steps=3))
    with pytest.raises(OtherConfigState, match="another config"):
        pretrain(config(tmp_path, steps=3, lr=0.01))
    pretrain(config(tmp_path, steps=3, lr=0.01, resume=False))  # starting over is allowed


def test_a_changed_base_file_is_refused(tmp_path: Path) -> None:
    pretrain(config(tmp_path, steps=2))
    model = load_model(tmp_path / BASE_FILE)
    with torch.no_grad():
        model.embed.weight[0, 0] += 1.0
    save_model(tmp_path / BASE_FILE, model)
    with pytest.raises(InputError, match="its manifest records"):
        load_base(tmp_path / BASE_FILE)
    (tmp_path / MANIFEST_FILE).unlink()
    with pytest.raises(InputError, match="no manifest"):
        load_base(tmp_path / BASE_FILE)


def test_a_federation_takes_the_base_models_shape(tmp_path: Path) -> None:
    pretrain(config(tmp_path, steps=1))
    fed = federation_from_base(
        FederationConfig.model_validate({"base": tmp_path / BASE_FILE, "train": {"seq_len": 32}})
    )
    assert fed.model.glm_args() == ModelConfig.model_validate(SMALL).glm_args()
    other = FederationConfig.model_validate({"base": tmp_path / BASE_FILE, "model": {"preset": "tiny"}})
    with pytest.raises(InputError, match="is not the shape of the base model"):
        federation_from_base(other)
    too_long = FederationConfig.model_validate({"base": tmp_path / BASE_FILE, "train": {"seq_len": 128}})
    with pytest.raises(InputError, match=r"train.seq_len \(128\) exceeds model.max_seq_len \(64\)"):
        federation_from_base(too_long)
