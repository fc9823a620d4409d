from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Glm4Config,
    GlmConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)

import fedglm.models  # noqa: F401  (offline, quiet transformers)
from fedglm.models.families import FAMILIES, Shape, shape_of
from fedglm.models.pruning import (
    Mask,
    choose_mask,
    importance,
    pruned_config,
    slice_state,
    zero_pruned,
)

CONFIGS: dict[str, type[PretrainedConfig]] = {
    "Glm4ForCausalLM": Glm4Config,
    "GlmForCausalLM": GlmConfig,
    "LlamaForCausalLM": LlamaConfig,
    "Qwen2ForCausalLM": Qwen2Config,
}
ARCHITECTURES = list(CONFIGS)


def tiny_config(architecture: str, **overrides: Any) -> PretrainedConfig:
    sizes: dict[str, Any] = {
        "vocab_size": 300,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 96,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
        "architectures": [architecture],
        **({"attention_bias": True} if architecture != "LlamaForCausalLM" else {}),
        **overrides,
    }
    return CONFIGS[architecture](**{key: value for key, value in sizes.items() if value is not None})


def trained_like(config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    """A random model whose rows differ in scale and whose biases are not zero, as trained ones."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() == 2:
                param.copy_(noise * 0.1 * (torch.rand(param.shape[0], 1, generator=generator) * 2))
            else:
                param.add_(noise * 0.1)
    return model.eval()


def tokens() -> torch.Tensor:
    return torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(7))


def logits(model: PreTrainedModel) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=tokens(), use_cache=False).logits
    return out


def state_of(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def per_group(mask: Mask, shape: Shape) -> set[int]:
    return {
        sum(1 for h in heads if h // shape.group == group)
        for heads in mask.heads
        for group in range(shape.kv_heads)
    }


def reload_sliced(config: PretrainedConfig, sliced: dict[str, torch.Tensor], folder: Path) -> PreTrainedModel:
    """Save the sliced weights as a folder and load it back; no weight may be missing or re-initialised."""
    small = AutoModelForCausalLM.from_config(config)
    small.load_state_dict(sliced, strict=True)
    small.save_pretrained(folder, safe_serialization=True)
    loaded, info = AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, output_loading_info=True
    )
    assert all(not info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return loaded.eval()


@pytest.mark.parametrize(
    ("architecture", "overrides"),
    [
        *((a, {}) for a in ARCHITECTURES),
        ("LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True}),
        ("Qwen2ForCausalLM", {"head_dim": None}),  # head_dim from hidden // heads: must not change
    ],
    ids=[*ARCHITECTURES, "Llama-with-biases", "Qwen2-without-head_dim"],
)
def test_the_reloaded_sliced_folder_gives_the_masked_models_logits(
    architecture: str, overrides: dict[str, Any], tmp_path: Path
) -> None:
    config = tiny_config(architecture, **overrides)
    shape, family = shape_of(config), FAMILIES[architecture]
    model = trained_like(config)
    state = state_of(model)
    mask = choose_mask(state, shape, family, Mask.full(shape), heads=0.5, channels=1 / 3)

    sliced = slice_state(state, shape, family, Mask.full(shape), mask)
    small_config = pruned_config(config, mask)
    loaded = reload_sliced(small_config, sliced, tmp_path / "pruned")
    zero_pruned(model, mask)

    assert mask.kept() == (2, 64)
    assert loaded.config.num_attention_heads == 2 and loaded.config.num_key_value_heads == 2
    assert loaded.config.head_dim == 16 and loaded.config.intermediate_size == 64
    assert config.num_attention_heads == 4 and config.intermediate_size == 96  # a copy was changed
    assert torch.allclose(logits(loaded), logits(model), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_slicing_in_two_steps_equals_slicing_at_once(architecture: str) -> None:
    config = tiny_config(architecture)
    shape, family = shape_of(config), FAMILIES[architecture]
    state = state_of(trained_like(config))
    full = Mask.full(shape)
    mid = choose_mask(state, shape, family, full, heads=0.0, channels=0.25)
    once = slice_state(state, shape, family, full, mid)
    target = choose_mask(once, shape, family, mid, heads=0.5, channels=0.5)

    twice = slice_state(once, shape, family, mid, target)
    direct = slice_state(state, shape, family, full, target)

    assert target.within(mid) and mid.within(full) and not full.within(mid)
    assert mid.kept() == (4, 72) and target.kept() == (2, 48)
    assert twice.keys() == direct.keys() == state.keys()
    assert all(torch.equal(twice[name], direct[name]) for name in direct)


def with_adapters(
    state: dict[str, torch.Tensor], architecture: str, rank: int = 3
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    out = dict(state)
    for name in state:
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            module = name.removesuffix(".weight")
            rows, cols = state[name].shape
            out[f"{module}.lora_A.weight"] = torch.randn(rank, cols, generator=generator)
            out[f"{module}.lora_B.weight"] = torch.randn(rows, rank, generator=generator)
    assert sum(".lora_B." in name for name in out) == 2 * len(FAMILIES[architecture].projections)
    return out


def merged(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """W + B @ A for every adapted weight, adapters dropped (an independent merge)."""
    out = {name: t for name, t in state.items() if ".lora_" not in name}
    for name in out:
        module = name.removesuffix(".weight")
        if f"{module}.lora_A.weight" in state:
            out[name] = out[name] + state[f"{module}.lora_B.weight"] @ state[f"{module}.lora_A.weight"]
    return out


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_lora_adapters_are_sliced_with_the_weights_they_adapt(architecture: str) -> None:
    config = tiny_config(architecture)
    shape, family = shape_of(config), FAMILIES[architecture]
    state = with_adapters(state_of(trained_like(config)), architecture)
    before = {name: tensor.clone() for name, tensor in state.items()}
    mask = choose_mask(state, shape, family, Mask.full(shape), heads=0.5, channels=0.5)

    sliced = slice_state(state, shape, family, Mask.full(shape), mask)
    from_merged = slice_state(merged(state), shape, family, Mask.full(shape), mask)

    after = merged(sliced)
    assert after.keys() == from_merged.keys()
    for name in after:
        torch.testing.assert_close(after[name], from_merged[name], rtol=1e-5, atol=1e-5)
    assert all(torch.equal(state[name], before[name]) for name in before)  # the input is not changed
    q, o = "model.layers.0.self_attn.q_proj.lora_", "model.layers.0.self_attn.o_proj.lora_"
    assert sliced[q + "B.weight"].shape == (32, 3) and sliced[q + "A.weight"] is state[q + "A.weight"]
    assert sliced[o + "A.weight"].shape == (3, 32) and sliced[o + "B.weight"] is state[o + "B.weight"]
    k = "model.layers.0.self_attn.k_proj.weight"
    assert sliced[k] is state[k]  # key/value heads are never pruned: passed through


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_choose_mask_is_deterministic_and_even_across_layers_and_groups(architecture: str) -> None:
    config = tiny_config(architecture, num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    shape, family = shape_of(config), FAMILIES[architecture]
    state = state_of(trained_like(config))

    masks = [choose_mask(state, shape, family, Mask.full(shape), heads=0.5, channels=0.3) for _ in range(2)]
    again = choose_mask(
        state_of(trained_like(config)), shape, family, Mask.full(shape), heads=0.5, channels=0.3
    )

    assert masks[0] == masks[1] == again
    mask = masks[0]
    assert {len(h) for h in mask.heads} == {4} and {len(c) for c in mask.channels} == {67}  # 96 * 0.7
    assert per_group(mask, shape) == {2}
    assert Mask.from_json(mask.to_json(), shape) == mask


def test_the_most_important_heads_and_channels_are_kept_within_each_group() -> None:
    config = tiny_config("Glm4ForCausalLM")
    shape, family = shape_of(config), FAMILIES["Glm4ForCausalLM"]
    state = state_of(trained_like(config))
    state["model.layers.0.self_attn.o_proj.weight"][:, 16:32] *= 100.0  # head 1, group 0
    state["model.layers.1.self_attn.q_proj.weight"][0:16] *= 100.0  # head 0, group 0
    state["model.layers.0.mlp.gate_up_proj.weight"][96 + 5] *= 100.0  # up row of channel 5

    heads, channels = importance(state, shape, family)
    mask = choose_mask(state, shape, family, Mask.full(shape), heads=0.75, channels=0.99)

    assert heads.shape == (2, 4) and channels.shape == (2, 96)
    assert int(heads[0].argmax()) == 1 and int(heads[1].argmax()) == 0 and int(channels[0].argmax()) == 5
    assert mask.heads[0][0] == 1 and mask.heads[1][0] == 0 and len(mask.heads[0]) == 2  # one per group
    assert mask.channels[0] == (5,) and mask.kept() == (2, 1)


def test_ties_break_towards_the_lower_index() -> None:
    config = tiny_config("Qwen2ForCausalLM")
    shape, family = shape_of(config), FAMILIES["Qwen2ForCausalLM"]
    state = {name: torch.ones_like(t) for name, t in state_of(trained_like(config)).items()}

    mask = choose_mask(state, shape, family, Mask.full(shape), heads=0.5, channels=0.5)

    assert mask.heads == ((0, 2), (0, 2)) and mask.channels == (tuple(range(48)),) * 2


def test_masks_only_shrink_and_a_state_of_another_mask_is_refused() -> None:
    config = tiny_config("LlamaForCausalLM")
    shape, family = shape_of(config), FAMILIES["LlamaForCausalLM"]
    state = state_of(trained_like(config))
    full = Mask.full(shape)
    mask = choose_mask(state, shape, family, full, heads=0.5, channels=0.5)
    sliced = slice_state(state, shape, family, full, mask)

    with pytest.raises(ValueError, match="only remove"):
        slice_state(sliced, shape, family, mask, full)
    with pytest.raises(ValueError, match=r"q_proj\.weight has shape \(32, 64\)"):
        slice_state(sliced, shape, family, full, mask)
    assert choose_mask(sliced, shape, family, mask, heads=0.0, channels=0.0) == mask  # never regrows


def test_llama_is_refused_a_head_count_its_config_cannot_hold(tmp_path: Path) -> None:
    llama = tiny_config("LlamaForCausalLM", num_key_value_heads=1)
    shape, family = shape_of(llama), FAMILIES["LlamaForCausalLM"]
    state = state_of(trained_like(llama))
    three = Mask(heads=((0, 1, 2), (1, 2, 3)), channels=(tuple(range(96)),) * 2)

    with pytest.raises(ValueError, match=r"hidden_size \(64\) to be a multiple.*keep one of \[1, 2, 4\]"):
        choose_mask(state, shape, family, Mask.full(shape), heads=0.25, channels=0.0)
    with pytest.raises(ValueError, match="3 query heads cannot be saved or loaded"):
        pruned_config(llama, three)

    # GLM-4 holds the same count: the folder loads and computes what the masked model does.
    glm4 = tiny_config("Glm4ForCausalLM", num_key_value_heads=1)
    model = trained_like(glm4)
    sliced = slice_state(state_of(model), shape, FAMILIES["Glm4ForCausalLM"], Mask.full(shape), three)
    loaded = reload_sliced(pruned_config(glm4, three), sliced, tmp_path / "glm4")
    zero_pruned(model, three)
    assert loaded.config.num_attention_heads == 3
    assert torch.allclose(logits(loaded), logits(model), atol=1e-5, rtol=0)


SHAPE = Shape(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, channels=96)


def test_mask_json_round_trips_compactly() -> None:
    mask = Mask(heads=((0, 3), (1, 2)), channels=(tuple(range(0, 96, 2)), tuple(range(48, 96))))

    text = mask.to_json()

    assert Mask.from_json(text, SHAPE) == mask
    assert Mask.from_json(Mask.full(SHAPE).to_json(), SHAPE) == Mask.full(SHAPE)
    assert json.loads(text)["heads"] == ["9", "6"] and " " not in text
    assert mask.kept() == (2, 48)


FULL_CHANNELS = "f" * 24
BAD_MASKS = {
    "not text": (b'{"heads":[]}', "must be JSON text"),
    "huge": ('{"heads":["' + "1" * 10_000 + '"]}', "over the"),
    "not json": ("heads: 1", "not valid JSON"),
    "deep": ("[" * 300 + "]" * 300, "over the|not valid JSON|JSON object"),
    "not an object": ('["3","3"]', "JSON object"),
    "extra key": ('{"heads":["3","3"],"channels":["1","1"],"x":1}', "exactly 'heads' and 'channels'"),
    "layers": ('{"heads":["5"],"channels":["1","1"]}', "must list 2 layers, got 1"),
    "not a list": ('{"heads":"5","channels":["1","1"]}', "must list 2 layers, got str"),
    "non-string": (
        '{"heads":[5,5],"channels":["1","1"]}',
        "heads of layer 0 must be a lowercase hexadecimal",
    ),
    "not hex": (
        '{"heads":["5","0x5"],"channels":["1","1"]}',
        "heads of layer 1 must be a lowercase hexadecimal",
    ),
    "sign": ('{"heads":["5","5"],"channels":["+1","1"]}', "channels of layer 0 must be a lowercase"),
    "empty string": ('{"heads":["5","5"],"channels":["","1"]}', "channels of layer 0 must be a lowercase"),
    "empty": ('{"heads":["5","5"],"channels":["1","0"]}', "keeps no channels in layer 1"),
    "head out of range": ('{"heads":["5","11"],"channels":["1","1"]}', "layer 1 names index 4, out of range"),
    "channel out of range": (
        f'{{"heads":["5","5"],"channels":["1","1{FULL_CHANNELS}"]}}',
        "channels of layer 1 names index 96",
    ),
    "unequal layers": (
        '{"heads":["5","5"],"channels":["3","1"]}',
        "keeps 2 channels in layer 0 but 1 in layer 1",
    ),
    "unequal groups": ('{"heads":["3","3"],"channels":["1","1"]}', r"keeps \[2, 0\] query heads"),
}


@pytest.mark.parametrize("case", BAD_MASKS)
def test_a_malformed_mask_is_refused_with_one_line_naming_the_fault(case: str) -> None:
    text, message = BAD_MASKS[case]

    with pytest.raises(ValueError, match=message) as caught:
        Mask.from_json(text, SHAPE)  # type: ignore[arg-type]

    assert "\n" not in str(caught.value)
