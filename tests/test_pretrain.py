"""`fedglm pretrain`: resumable to the same result, a Hugging Face folder with a checked manifest,
and the base's shape for the federation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from fedglm.cli.main import app
from fedglm.config import PretrainConfig
from fedglm.errors import InputError
from fedglm.layout import BASE_MANIFEST, BASE_MODEL_DIR, PRETRAIN_STATE_FILE
from fedglm.models.base import BaseModel, open_run_base
from fedglm.models.causal import forward_logits
from fedglm.models.families import Shape
from fedglm.models.folder import WEIGHTS, folder_hash, load_model, load_tokenizer
from fedglm.models.tokenizer import encode_record
from fedglm.pretrain import MANIFEST_FORMAT, OtherConfigState, file_digest, pretrain, read_base_manifest

# the tiny preset (hidden 64, 2 layers, 4 heads in 2 KV groups, 176 channels, 256 positions)
TINY = Shape(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, channels=176)


def settings(out: Path, **overrides: object) -> dict[str, object]:
    return {
        "model": {"preset": "tiny", "vocab_size": 300},
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


def config(out: Path, **overrides: object) -> PretrainConfig:
    return PretrainConfig.model_validate(settings(out, **overrides))


class Stop(Exception):
    pass


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path: Path) -> None:
    whole = pretrain(config(tmp_path / "whole"))

    def stop_after_checkpoint(step: int, loss: float) -> None:
        if step == 5:  # after the state of step 3 was saved, before the one of step 6
            raise Stop

    with pytest.raises(Stop):
        pretrain(config(tmp_path / "cut"), on_step=stop_after_checkpoint)
    assert not (tmp_path / "cut" / BASE_MODEL_DIR).exists()
    assert (tmp_path / "cut" / PRETRAIN_STATE_FILE).is_file()
    steps: list[int] = []
    resumed = pretrain(config(tmp_path / "cut"), on_step=lambda step, loss: steps.append(step))
    assert steps == [4, 5, 6]
    # the same weights and the same tokenizer (restored from the state, not trained again)
    assert resumed["folder_hash"] == whole["folder_hash"]
    a, b = load_model(tmp_path / "whole" / BASE_MODEL_DIR), load_model(tmp_path / "cut" / BASE_MODEL_DIR)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert resumed["history"] == whole["history"]


def test_pretrain_writes_a_hugging_face_folder_with_its_manifest(tmp_path: Path) -> None:
    text = tmp_path / "public.jsonl"
    text.write_text(
        "".join(json.dumps({"answer": f"public answer number {i}. " * 3}) + "\n" for i in range(40))
    )
    out = tmp_path / "out"
    cfg_file = tmp_path / "pretrain.yaml"
    cfg_file.write_text(
        yaml.safe_dump(settings(out, text=[{"path": str(text), "field": "answer"}]) | {"out_dir": str(out)})
    )

    result = CliRunner().invoke(app, ["pretrain", "--config", str(cfg_file)])

    assert result.exit_code == 0, result.output
    folder = out / BASE_MODEL_DIR
    manifest = json.loads((folder / BASE_MANIFEST).read_text())
    assert manifest["format"] == MANIFEST_FORMAT and manifest["architecture"] == "Glm4ForCausalLM"
    assert manifest["model"] == {"preset": "tiny", "vocab_size": 300, "init_seed": 0}
    assert manifest["folder_hash"] == folder_hash(folder) and manifest["folder_hash"] in result.output
    assert read_base_manifest(folder) == manifest
    assert manifest["inputs"] == [
        {"path": str(text), "format": "jsonl", "field": "answer", "sha256": file_digest(text), "records": 40}
    ]
    assert manifest["steps"] == 6 and manifest["public_data_only"] is True
    assert manifest["final"]["val_loss"] > 0 and len(manifest["history"]) == 2
    # a standard folder: transformers loads it by itself, offline, without fedglm's code
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert type(model).__name__ == "Glm4ForCausalLM"
    assert model.config.vocab_size == len(tokenizer) == manifest["vocab_size"] <= 300
    assert sum(p.numel() for p in model.parameters()) == manifest["parameters"]
    assert tokenizer.decode(tokenizer.encode("public answer number 7.")) == "public answer number 7."
    ids = torch.tensor([encode_record(load_tokenizer(folder), "public answer number 3.")])
    with torch.no_grad():
        assert torch.equal(forward_logits(model, ids), forward_logits(load_model(folder), ids))
    base = BaseModel.open(folder)
    assert base.hash == manifest["folder_hash"] and base.shape == TINY
    assert base.parameters == manifest["parameters"]


def test_a_state_saved_under_another_config_is_refused(tmp_path: Path) -> None:
    pretrain(config(tmp_path, steps=3))
    with pytest.raises(OtherConfigState, match="another config"):
        pretrain(config(tmp_path, steps=3, lr=0.01))
    pretrain(config(tmp_path, steps=3, lr=0.01, resume=False))  # starting over is allowed


def test_a_changed_base_folder_no_longer_matches_its_manifest(tmp_path: Path) -> None:
    pretrain(config(tmp_path, steps=2))
    folder = tmp_path / BASE_MODEL_DIR
    assert read_base_manifest(folder) is not None
    weights = load_file(folder / WEIGHTS)
    weights["model.embed_tokens.weight"][0, 0] += 1.0
    save_file(weights, folder / WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(InputError, match="records another folder hash"):
        read_base_manifest(folder)
    (folder / BASE_MANIFEST).unlink()
    assert read_base_manifest(folder) is None  # a checkpoint from elsewhere: no provenance, no refusal


def test_a_federation_takes_the_base_folders_shape(tmp_path: Path) -> None:
    pretrain(config(tmp_path, steps=1))
    folder = tmp_path / BASE_MODEL_DIR
    base = open_run_base(folder, seq_len=32)
    assert base.shape == TINY and base.max_positions == 256
    assert base.family.architecture == "Glm4ForCausalLM"
    with pytest.raises(InputError, match=r"train.seq_len \(512\) exceeds the 256 positions"):
        open_run_base(folder, seq_len=512)
    with pytest.raises(ValueError, match=r"seq_len \(512\) exceeds the tiny preset's 256 positions"):
        config(tmp_path, seq_len=512)
