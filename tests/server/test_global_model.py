"""The global model's one owner: the order of holders and moves is kept inside it."""

from __future__ import annotations

import numpy as np
import torch

from fedglm.compression import Kind
from fedglm.compression.wire import unpack
from fedglm.config import LinkConfig
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
