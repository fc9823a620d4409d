from pathlib import Path

import numpy as np
import pytest
import torch

from fedglm.clients.state import HeldModel, load_held, load_residual, save_held, save_residual
from fedglm.clients.sync import StaleModel, check_pinned_base, receive_model
from fedglm.compression import CODECS, Header, Kind, PayloadError, decode, model_hash
from fedglm.compression.update import encode_tensors
from fedglm.compression.wire import pack
from fedglm.config import ModelConfig
from fedglm.errors import InputError
from fedglm.lora import LORA_TARGETS, LoraSpec, add_adapters, is_adapter
from fedglm.model import build_model
from fedglm.payload import expected_shapes
from fedglm.server.broadcast import Broadcast

CFG = ModelConfig(preset="tiny")
SHAPES = expected_shapes(build_model(CFG.glm_args(), 0))


def server() -> Broadcast:
    return Broadcast(dict(build_model(CFG.glm_args(), CFG.init_seed).state_dict()), initial=True)


def step(b: Broadcast, r: int) -> None:
    rng = np.random.default_rng(r)
    agg = {
        n: rng.standard_normal(int(np.prod(s))).astype(np.float32) * 1e-2 for n, s in b.update_shapes.items()
    }
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


LORA = LoraSpec(rank=4, alpha=8.0, targets=LORA_TARGETS, seed=1)


def lora_server() -> tuple[Broadcast, dict[str, tuple[int, ...]], bytes]:
    """A coordinator whose run starts from a base (seed 5) and trains LoRA adapters."""
    base = build_model(CFG.glm_args(), 5)
    base_hash = model_hash(base.state_dict())
    model = add_adapters(base, LORA)
    adapters = [name for name in model.state_dict() if is_adapter(name)]
    return Broadcast(dict(model.state_dict()), trainable=adapters), expected_shapes(model), base_hash


def test_a_lora_site_gets_the_base_once_then_changes_of_adapters_only() -> None:
    b, shapes, base_hash = lora_server()
    first = b.payload_for(1, 1)
    header, tensors = decode(first, shapes)
    assert header.kind == Kind.FULL and set(tensors) == set(shapes)
    held = receive_model(
        first, held=None, run="r", model_cfg=CFG, shapes=shapes, lora=LORA, base_hash=base_hash
    )
    assert held.hash == b.hash
    b.holds(1)
    step(b, 1)
    delta = b.payload_for(1, 2)
    header, tensors = decode(delta, shapes)
    assert header.kind == Kind.DELTA and tensors and all(is_adapter(name) for name in tensors)
    assert len(delta) < len(first) / 20
    held = receive_model(
        delta, held=held, run="r", model_cfg=CFG, shapes=shapes, lora=LORA, base_hash=base_hash
    )
    assert held.hash == b.hash


def test_a_full_model_on_another_base_is_refused() -> None:
    b, shapes, _ = lora_server()
    with pytest.raises(PayloadError, match="announced") as caught:
        receive_model(
            b.full(1), held=None, run="r", model_cfg=CFG, shapes=shapes, lora=LORA, base_hash=b"\x01" * 32
        )
    assert caught.value.reason == "wrong-base"


def test_a_change_to_the_frozen_base_is_refused() -> None:
    b, shapes, base_hash = lora_server()
    held = receive_model(
        b.full(1), held=None, run="r", model_cfg=CFG, shapes=shapes, lora=LORA, base_hash=base_hash
    )
    name = "blocks.0.attn.q_proj.weight"
    change = {name: np.full(int(np.prod(shapes[name])), 0.01, dtype=np.float32)}
    table, _ = encode_tensors(change, {name: shapes[name]}, CODECS["fp16"], density=1.0, selection="global")
    forged = pack(Header(Kind.DELTA, CODECS["fp16"].codec_id, 2, held.hash, b"\x03" * 32), table)
    with pytest.raises(PayloadError, match="frozen base"):
        receive_model(
            forged, held=held, run="r", model_cfg=CFG, shapes=shapes, lora=LORA, base_hash=base_hash
        )


def test_a_site_refuses_a_base_other_than_the_one_it_pins() -> None:
    pinned, other = "a" * 64, "b" * 64
    check_pinned_base(None, other)  # no pin: any base
    check_pinned_base(pinned, pinned)
    with pytest.raises(
        InputError, match=r"starts from base bbbbbbbbbbbbbbbb\.\.\., but this site accepts only base aaaa"
    ):
        check_pinned_base(pinned, other)
    with pytest.raises(InputError, match="no base model"):
        check_pinned_base(pinned, None)
