"""LoRA adapters: exact merging, frozen bases, and slicing with the weights they adapt."""

from __future__ import annotations

import pytest
import torch

from fedglm.lora import (
    LORA_TARGETS,
    LoraSpec,
    adapter_state,
    add_adapters,
    base_state,
    is_adapter,
    merge_adapters,
)
from fedglm.model import GLM, GLMArgs, build_model
from fedglm.privacy.dpsgd import DPMode, train_private
from fedglm.pruning import Mask, choose_mask, slice_state
from fedglm.training import make_optimizer

ARGS = GLMArgs(d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=32)
SPEC = LoraSpec(rank=4, alpha=8.0, targets=LORA_TARGETS, seed=3)
TOKENS = torch.randint(0, 258, (3, 20), generator=torch.Generator().manual_seed(0))


def adapted_with_random_b(seed: int = 1) -> GLM:
    model = add_adapters(build_model(ARGS, 0), SPEC)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_b.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def logits(model: GLM) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


def test_fresh_adapters_change_nothing_and_only_they_train() -> None:
    base = build_model(ARGS, 0)
    adapted = add_adapters(build_model(ARGS, 0), SPEC)
    torch.testing.assert_close(logits(adapted), logits(base), rtol=0, atol=0)
    trainable = {name for name, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter(name) for name in trainable)
    assert len(trainable) == 2 * len(LORA_TARGETS) * ARGS.n_layers


def test_every_party_builds_the_same_adapters() -> None:
    first = adapter_state(add_adapters(build_model(ARGS, 0), SPEC).state_dict())
    second = adapter_state(add_adapters(build_model(ARGS, 0), SPEC).state_dict())
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_merging_gives_the_logits_of_base_plus_adapters() -> None:
    adapted = adapted_with_random_b()
    merged = GLM(ARGS)
    merged.load_state_dict(merge_adapters(adapted.state_dict(), SPEC.scale))
    assert not torch.allclose(logits(adapted), logits(build_model(ARGS, 0)))
    torch.testing.assert_close(logits(merged), logits(adapted), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("o_proj", "down_proj", "up_proj")])
def test_adapters_on_some_projections_merge_too(targets: tuple[str, ...]) -> None:
    spec = LoraSpec(rank=2, alpha=2.0, targets=targets)
    adapted = add_adapters(build_model(ARGS, 0), spec)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if name.endswith("lora_b.weight"):
                param.fill_(0.05)
    merged = GLM(ARGS)
    merged.load_state_dict(merge_adapters(adapted.state_dict(), spec.scale))
    torch.testing.assert_close(logits(merged), logits(adapted), rtol=1e-5, atol=1e-5)


def test_pruning_slices_adapters_with_their_weights() -> None:
    """Slicing base + adapters, then merging, equals merging, then slicing."""
    state = dict(adapted_with_random_b().state_dict())
    full = Mask.full(ARGS)
    mask = choose_mask(merge_adapters(state, SPEC.scale), ARGS, full, heads=0.5, channels=0.5)
    sliced_then_merged = merge_adapters(slice_state(state, ARGS, full, mask), SPEC.scale)
    merged_then_sliced = slice_state(merge_adapters(state, SPEC.scale), ARGS, full, mask)
    assert sliced_then_merged.keys() == merged_then_sliced.keys()
    for name, tensor in merged_then_sliced.items():
        torch.testing.assert_close(sliced_then_merged[name], tensor, rtol=1e-5, atol=1e-6)
    small = add_adapters(GLM(mask.shape(ARGS)), SPEC)
    small.load_state_dict(slice_state(state, ARGS, full, mask))  # shapes fit a sliced adapted model


def test_a_residual_of_adapters_only_slices() -> None:
    state = adapter_state(adapted_with_random_b().state_dict())
    full = Mask.full(ARGS)
    mask = Mask(heads=((0, 1), (2, 3)), channels=(tuple(range(24)), tuple(range(24, 48))))
    sliced = slice_state(state, ARGS, full, mask)
    assert sliced.keys() == state.keys()
    assert sliced["blocks.0.attn.q_proj.lora_b.weight"].shape == (16, 4)
    assert sliced["blocks.1.mlp.down_proj.lora_a.weight"].shape == (4, 24)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_dp_sgd_trains_the_adapters_and_leaves_the_base_untouched(mode: DPMode) -> None:
    model = add_adapters(build_model(ARGS, 0), LoraSpec(rank=2, alpha=4.0, targets=LORA_TARGETS, seed=1))
    before = {name: t.clone() for name, t in model.state_dict().items()}
    records = [[256, *range(40 + i), 257] for i in range(30)]
    train_private(
        model,
        records,
        optimizer=make_optimizer(model, name="adamw", lr=1e-2, momentum=0.0, weight_decay=0.0),
        q=0.3,
        sigma=1.0,
        clip_norm=1.0,
        steps=3,
        seq_len=16,
        precision="fp32",
        mode=mode,
        device=torch.device("cpu"),
        expected_batch_size=9.0,
    )
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in base_state(after))
    assert all(not torch.equal(before[name], after[name]) for name in adapter_state(after))
