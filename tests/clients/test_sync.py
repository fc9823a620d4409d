from pathlib import Path

import numpy as np
import pytest
import torch

from fedglm.clients.state import HeldModel, load_held, load_residual, save_held, save_residual
from fedglm.clients.sync import StaleModel, receive_model
from fedglm.compression import CODECS
from fedglm.config import ModelConfig
from fedglm.model import build_model
from fedglm.payload import expected_shapes
from fedglm.server.broadcast import Broadcast

CFG = ModelConfig(preset="tiny")
SHAPES = expected_shapes(build_model(CFG.glm_args(), 0))


def server() -> Broadcast:
    return Broadcast(dict(build_model(CFG.glm_args(), CFG.init_seed).state_dict()), initial=True)


def step(b: Broadcast, r: int) -> None:
    rng = np.random.default_rng(r)
    agg = {n: rng.standard_normal(int(np.prod(s))).astype(np.float32) * 1e-2 for n, s in b.shapes.items()}
    b.advance(agg, r, codec=CODECS["topk"], density=0.02, selection="global")


def test_init_then_delta_then_hold() -> None:
    b = server()
    held = receive_model(b.payload_for(1, 1), held=None, run="r", model_cfg=CFG, shapes=SHAPES)
    assert held.hash == b.hash
    b.holds(1)
    step(b, 1)
    held = receive_model(b.payload_for(1, 1), held=held, run="r", model_cfg=CFG, shapes=SHAPES)
    assert held.hash == b.hash
    b.holds(1)
    assert receive_model(b.payload_for(1, 2), held=held, run="r", model_cfg=CFG, shapes=SHAPES) is held


def test_full_model_for_a_site_that_holds_nothing() -> None:
    b = server()
    step(b, 1)
    held = receive_model(b.full(2), held=None, run="r", model_cfg=CFG, shapes=SHAPES)
    assert held.hash == b.hash
    assert all(torch.equal(held.state[n], b.state[n]) for n in b.shapes)


def test_delta_on_the_wrong_model_is_stale() -> None:
    b = server()
    b.holds(1)
    step(b, 1)
    assert b.delta is not None
    with pytest.raises(StaleModel, match="stale-model"):
        receive_model(b.delta, held=None, run="r", model_cfg=CFG, shapes=SHAPES)
    other = HeldModel("r", b"\x02" * 32, {n: t.clone() for n, t in b.state.items()})
    with pytest.raises(StaleModel):
        receive_model(b.delta, held=other, run="r", model_cfg=CFG, shapes=SHAPES)


def test_init_with_another_seed_is_stale() -> None:
    b = server()
    with pytest.raises(StaleModel):
        receive_model(
            b.payload_for(1, 1),
            held=None,
            run="r",
            model_cfg=CFG.model_copy(update={"init_seed": 5}),
            shapes=SHAPES,
        )


def test_state_persists_per_run(tmp_path: Path) -> None:
    b = server()
    held = HeldModel("run-a", b.hash, b.state)
    save_held(tmp_path, held)
    loaded = load_held(tmp_path, "run-a")
    assert loaded is not None and loaded.hash == b.hash
    assert load_held(tmp_path, "run-b") is None
    residual = {n: np.arange(int(np.prod(s)), dtype=np.float32) for n, s in b.shapes.items()}
    save_residual(tmp_path, "run-a", residual)
    back = load_residual(tmp_path, "run-a", b.shapes)
    assert back is not None and all(np.array_equal(back[n], residual[n]) for n in residual)
    assert load_residual(tmp_path, "run-b", b.shapes) is None
    assert load_residual(tmp_path, "run-a", {"other": (3,)}) is None
    (tmp_path / "residual.pt").write_bytes(b"garbage")
    assert load_residual(tmp_path, "run-a", b.shapes) is None
