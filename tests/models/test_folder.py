"""Model folders: what loads, what is refused with one line, and the hash a site pins."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedglm.errors import InputError
from fedglm.models.causal import forward_logits
from fedglm.models.folder import folder_hash, load_model, load_tokenizer, save_folder
from fedglm.models.tokenizer import encode_record, train_tokenizer
from tests.models.conftest import ARCHITECTURES, tiny_model

TEXT = ["Patient seen for chest pain; ECG normal. 患者は胸痛で受診。", "Follow-up in two weeks."] * 40


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXT, vocab_size=300)


def _saved(tmp_path: Path, tokenizer, architecture: str = "Glm4ForCausalLM") -> Path:
    folder = tmp_path / architecture
    save_folder(tiny_model(architecture), tokenizer, folder)
    return folder


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_each_family_round_trips_with_identical_logits(tmp_path: Path, tokenizer, architecture: str) -> None:
    model = tiny_model(architecture).eval()
    save_folder(model, tokenizer, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert type(loaded).__name__ == architecture and loaded.training
    tokens = torch.tensor([encode_record(load_tokenizer(tmp_path / "m"), TEXT[0])])
    assert torch.equal(forward_logits(model, tokens), forward_logits(loaded.eval(), tokens))
    assert all(oct(p.stat().st_mode & 0o777) == "0o644" for p in (tmp_path / "m").iterdir())


def test_hash_covers_weights_config_and_tokenizer(tmp_path: Path, tokenizer) -> None:
    folder = _saved(tmp_path, tokenizer)
    first = folder_hash(folder)
    assert folder_hash(folder) == first
    (folder / "README.md").write_text("notes do not change the model")
    assert folder_hash(folder) == first
    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"][0, 0] += 1e-3
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    second = folder_hash(folder)
    assert second != first
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    assert folder_hash(folder) not in (first, second)
    tokens = json.loads((folder / "tokenizer.json").read_text())
    tokens["added_tokens"][0]["content"] = "<|start|>"
    (folder / "tokenizer.json").write_text(json.dumps(tokens))
    third = folder_hash(folder)
    assert len({first, second, third}) == 3
    # a same-size edit with its modification time put back is still seen (hashes are cached per file state)
    path = folder / "tokenizer.json"
    before = path.stat()
    path.write_text(path.read_text().replace("<|start|>", "<|begin|>"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    assert folder_hash(folder) != third


def _refused(folder: Path, match: str) -> None:
    with pytest.raises(InputError, match=match):
        load_model(folder)


def test_remote_code_is_refused_before_anything_runs(tmp_path: Path, tokenizer) -> None:
    folder = _saved(tmp_path, tokenizer)
    marker = tmp_path / "ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    _refused(folder, "auto_map.*never runs a model folder's code")
    assert not marker.exists()


def test_an_untested_architecture_is_refused_by_name(tmp_path: Path, tokenizer) -> None:
    folder = _saved(tmp_path, tokenizer)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    _refused(folder, "'MistralForCausalLM' is not one fedglm has tested")


def test_a_missing_shard_is_refused(tmp_path: Path, tokenizer) -> None:
    folder = tmp_path / "sharded"
    model = tiny_model("Glm4ForCausalLM")
    model.save_pretrained(folder, max_shard_size="50KB")
    tokenizer.save_pretrained(folder)
    assert load_model(folder) is not None
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    _refused(folder, f"weight shard {shards[-1].name} named in model.safetensors.index.json is missing")


def test_a_missing_weight_is_refused_not_randomly_initialised(tmp_path: Path, tokenizer) -> None:
    folder = _saved(tmp_path, tokenizer)
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    _refused(folder, "weights missing: model.layers.1.mlp.down_proj.weight")


def test_pickled_weights_and_missing_parts_are_refused(tmp_path: Path, tokenizer) -> None:
    folder = _saved(tmp_path, tokenizer)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    _refused(folder, "pickled .bin/.pt files")
    (folder / "pytorch_model.bin").unlink()
    _refused(folder, "no model.safetensors")
    _refused(tmp_path / "nowhere", "does not exist")
    other = _saved(tmp_path, tokenizer, "LlamaForCausalLM")
    (other / "tokenizer.json").unlink()
    _refused(other, "no tokenizer.json")
    (other / "config.json").write_text("{not json")
    _refused(other, "unreadable model config")
