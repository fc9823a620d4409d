"""The global model's one owner: the order of holders and moves is kept inside it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedglm.compression import Kind
from fedglm.compression.wire import unpack
from fedglm.config import LinkConfig, PruneStep, PruningConfig
from fedglm.models.base import BaseModel
from fedglm.models.lora import LoraSpec, is_trained_adapter, merge_adapters, wire_state
from fedglm.models.pruning import Mask, choose_mask, slice_state
from fedglm.server.broadcast import Broadcast
from fedglm.server.global_model import GlobalModel

SHAPES = {"w": (2, 2), "b": (2,)}
DENSE = LinkConfig(codec="dense")


def make_model() -> GlobalModel:
    return GlobalModel(Broadcast({n: torch.zeros(s) for n, s in SHAPES.items()}, initial=True))


def update(value: float) -> dict[str, np.ndarray]:
    return {n: np.full(int(np.prod(s)), value, dtype=np.float32) for n, s in SHAPES.items()}


def test_nodes_that_trained_held_the_model_before_it_moved() -> None:
    model = make_model()
    before = model.hash
    model.finish_train(update(1.0), 1, [3, 4], DENSE)
    assert model.hash != before
    assert model.broadcast.holders == {3: before, 4: before}
    # so they get the round's DELTA from the model they hold, not the full model
    delta = unpack(model.payload_for(3, 2), SHAPES, 1 << 20).header
    assert delta.kind == Kind.DELTA and delta.base == before and delta.target == model.hash
    assert torch.equal(model.broadcast.state["w"], torch.ones(2, 2))


def test_no_update_moves_nothing_and_records_no_holder() -> None:
    model = make_model()
    before = model.hash
    model.finish_train(None, 1, [3], DENSE)
    assert model.hash == before and model.broadcast.holders == {}


def test_nodes_that_evaluated_hold_the_current_model() -> None:
    model = make_model()
    model.finish_train(update(1.0), 1, [3], DENSE)
    model.finish_evaluate([3, 5])
    assert model.broadcast.holders == {3: model.hash, 5: model.hash}
    assert unpack(model.payload_for(5, 2), SHAPES, 1 << 20).header.kind == Kind.DELTA  # empty: holds it


def test_a_stale_node_gets_the_full_model_and_is_forgotten() -> None:
    model = make_model()
    model.finish_evaluate([7])
    assert unpack(model.full(7, 1), SHAPES, 1 << 20).header.kind == Kind.FULL
    assert 7 not in model.broadcast.holders


def test_the_checkpoint_is_the_model_as_it_stands() -> None:
    model = make_model()
    model.finish_train(update(2.0), 1, [1], DENSE)
    checkpoint = model.checkpoint(1, run_key="run", fingerprint="fp")
    assert (checkpoint.round, checkpoint.run_key, checkpoint.fingerprint, checkpoint.mask) == (
        1,
        "run",
        "fp",
        "",
    )
    assert torch.equal(checkpoint.state["b"], torch.full((2,), 2.0))
    assert set(checkpoint.residual) == set(SHAPES)


# --- pruning: the mask of a base folder's model --------------------------------------------------

PRUNE_AT_2 = PruningConfig(schedule=[PruneStep(round=2, heads=0.5, channels=0.25)])


def test_pruning_needs_the_base_model() -> None:
    with pytest.raises(ValueError, match="pruning needs the unpruned model's shape"):
        GlobalModel(Broadcast({n: torch.zeros(s) for n, s in SHAPES.items()}), pruning=PRUNE_AT_2)


def test_the_schedule_slices_the_global_model_of_the_base(tiny_base: Path) -> None:
    base = BaseModel.open(tiny_base)
    state = dict(wire_state(base.build(lora=None)))
    model = GlobalModel(Broadcast(dict(state), initial=True), base=base, pruning=PRUNE_AT_2)
    assert model.mask == Mask.full(base.shape) and model.mask_json == ""
    assert not model.prune(1)

    assert model.prune(2)
    heads, channels = model.mask.kept()
    assert (heads, channels) == (2, 132)  # one query head per KV group of 2; 3/4 of 176 channels
    assert model.mask_json == model.mask.to_json() != ""
    assert Mask.from_json(model.mask_json, base.shape) == model.mask  # what a site reads back
    sliced = model.broadcast.state
    hd = base.shape.head_dim
    assert sliced["model.layers.0.self_attn.q_proj.weight"].shape == (heads * hd, base.shape.hidden)
    assert sliced["model.layers.1.self_attn.o_proj.weight"].shape == (base.shape.hidden, heads * hd)
    assert sliced["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * channels, base.shape.hidden)
    assert sliced["model.layers.1.mlp.down_proj.weight"].shape == (base.shape.hidden, channels)
    assert sliced["model.layers.0.self_attn.k_proj.weight"].shape == (
        base.shape.kv_heads * hd,
        base.shape.hidden,
    )
    expected = slice_state(state, base.shape, base.family, Mask.full(base.shape), model.mask)
    assert all(torch.equal(sliced[name], expected[name]) for name in expected)
    assert not model.prune(3)  # no step at round 3: the mask stays


def test_lora_runs_rank_heads_and_channels_by_the_merged_weights(tiny_base: Path) -> None:
    base = BaseModel.open(tiny_base)
    lora = LoraSpec(rank=2, alpha=4.0, targets=base.family.projections, seed=1)
    state = dict(wire_state(base.build(lora=lora)))
    generator = torch.Generator().manual_seed(0)
    for name in state:  # trained B: the merged model differs from the base
        if is_trained_adapter(name):
            state[name] = torch.randn(state[name].shape, generator=generator)
    trainable = [name for name in state if is_trained_adapter(name)]
    model = GlobalModel(
        Broadcast(dict(state), initial=True, trainable=trainable),
        base=base,
        pruning=PRUNE_AT_2,
        lora_scale=lora.scale,
    )
    assert model.prune(2)
    merged = merge_adapters(state, lora.scale)
    full = Mask.full(base.shape)
    assert model.mask == choose_mask(merged, base.shape, base.family, full, heads=0.5, channels=0.25)
    # (ranked by the frozen weights alone, another mask: the adapters' change decides)
    assert model.mask != choose_mask(state, base.shape, base.family, full, heads=0.5, channels=0.25)
    sliced = model.broadcast.state
    assert set(sliced) == set(state)  # the adapters stay adapters, sliced with their weights
    gate_up = "model.layers.0.mlp.gate_up_proj"
    assert sliced[f"{gate_up}.lora_B.weight"].shape == (2 * 132, 2)
    assert sliced[f"{gate_up}.lora_A.weight"].shape == (2, base.shape.hidden)
    assert sliced["model.layers.0.mlp.down_proj.lora_A.weight"].shape == (2, 132)
    assert set(model.broadcast.residual) == set(trainable)
