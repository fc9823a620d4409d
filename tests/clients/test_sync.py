from pathlib import Path

import numpy as np
import pytest
import torch

from fedglm.clients.state import HeldModel, load_held, load_residual, save_held, save_residual
from fedglm.clients.sync import StaleModel, check_base, receive_model
from fedglm.compression import CODECS, Header, Kind, PayloadError, decode
from fedglm.compression.update import encode_tensors
from fedglm.compression.wire import pack
from fedglm.errors import InputError
from fedglm.models.base import BaseModel
from fedglm.models.lora import LoraSpec, is_trained_adapter, wire_state
from fedglm.payload import expected_shapes
from fedglm.server.broadcast import Broadcast
from tests.bases import make_base


@pytest.fixture(scope="module")
def base(tiny_base: Path) -> BaseModel:
    return BaseModel.open(tiny_base)


@pytest.fixture(scope="module")
def other_base(tmp_path_factory: pytest.TempPathFactory) -> BaseModel:
    """Another base folder of the same architecture and shapes: other weights."""
    return BaseModel.open(make_base(tmp_path_factory.mktemp("other") / "model", seed=1))


def server(base: BaseModel) -> Broadcast:
    """A coordinator's first model: the base (full fine-tuning), sent as INIT."""
    return Broadcast(dict(wire_state(base.build(lora=None))), initial=True)


def shapes(base: BaseModel, lora: LoraSpec | None = None) -> dict[str, tuple[int, ...]]:
    return expected_shapes(base.empty(lora=lora))


def step(b: Broadcast, r: int) -> None:
    rng = np.random.default_rng(r)
    agg = {
        n: rng.standard_normal(int(np.prod(s))).astype(np.float32) * 1e-2 for n, s in b.update_shapes.items()
    }
    b.advance(agg, r, codec=CODECS["topk"], density=0.02, selection="global")


def test_init_then_delta_then_hold(base: BaseModel) -> None:
    b, s = server(base), shapes(base)
    held = receive_model(b.payload_for(1, 1), held=None, run="r", base=base, shapes=s)
    assert held.hash == b.hash
    b.holds(1)
    step(b, 1)
    held = receive_model(b.payload_for(1, 1), held=held, run="r", base=base, shapes=s)
    assert held.hash == b.hash
    b.holds(1)
    assert receive_model(b.payload_for(1, 2), held=held, run="r", base=base, shapes=s) is held


def test_full_model_for_a_site_that_holds_nothing(base: BaseModel) -> None:
    b = server(base)
    step(b, 1)
    held = receive_model(b.full(2), held=None, run="r", base=base, shapes=shapes(base))
    assert held.hash == b.hash
    assert all(torch.equal(held.state[n], b.state[n]) for n in b.shapes)


def test_delta_on_the_wrong_model_is_stale(base: BaseModel) -> None:
    b = server(base)
    b.holds(1)
    step(b, 1)
    assert b.delta is not None
    with pytest.raises(StaleModel, match="stale-model"):
        receive_model(b.delta, held=None, run="r", base=base, shapes=shapes(base))
    other = HeldModel("r", b"\x02" * 32, {n: t.clone() for n, t in b.state.items()})
    with pytest.raises(StaleModel):
        receive_model(b.delta, held=other, run="r", base=base, shapes=shapes(base))


def test_init_that_the_site_cannot_rebuild_is_stale(base: BaseModel, other_base: BaseModel) -> None:
    """INIT names the model by hash only: a site building from another folder, or drawing LoRA's
    A from another seed, gets another model and says so instead of training on it."""
    b = server(base)
    with pytest.raises(StaleModel, match="INIT payload hashes to"):
        receive_model(b.payload_for(1, 1), held=None, run="r", base=other_base, shapes=shapes(other_base))
    lora = LoraSpec(rank=4, alpha=8.0, targets=base.family.projections, seed=1)
    adapted = Broadcast(dict(wire_state(base.build(lora=lora))), initial=True)
    reseeded = LoraSpec(rank=4, alpha=8.0, targets=base.family.projections, seed=5)
    with pytest.raises(StaleModel):
        receive_model(
            adapted.payload_for(1, 1), held=None, run="r", base=base, shapes=shapes(base, lora), lora=reseeded
        )


def test_state_persists_per_run(tmp_path: Path, base: BaseModel) -> None:
    b = server(base)
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


def lora_spec(base: BaseModel) -> LoraSpec:
    return LoraSpec(rank=4, alpha=8.0, targets=base.family.projections, seed=1)


def lora_server(base: BaseModel, *, initial: bool = True) -> Broadcast:
    """A coordinator whose run starts from `base` and trains LoRA adapters (only B moves)."""
    state = dict(wire_state(base.build(lora=lora_spec(base))))
    trainable = [name for name in state if is_trained_adapter(name)]
    return Broadcast(state, initial=initial, trainable=trainable)


def test_a_lora_site_builds_the_first_model_itself_then_gets_changes_of_b_only(base: BaseModel) -> None:
    lora = lora_spec(base)
    s = shapes(base, lora)
    b = lora_server(base)
    first = b.payload_for(1, 1)
    header, tensors = decode(first, s)
    assert header.kind == Kind.INIT and not tensors  # the base never crosses the network
    held = receive_model(first, held=None, run="r", base=base, shapes=s, lora=lora)
    assert held.hash == b.hash
    b.holds(1)
    step(b, 1)
    delta = b.payload_for(1, 2)
    header, tensors = decode(delta, s)
    assert header.kind == Kind.DELTA and tensors and all(is_trained_adapter(name) for name in tensors)
    assert len(delta) < len(b.full(2)) / 20
    held = receive_model(delta, held=held, run="r", base=base, shapes=s, lora=lora)
    assert held.hash == b.hash


def test_a_full_model_on_another_base_is_refused(base: BaseModel, other_base: BaseModel) -> None:
    """Under LoRA the base is frozen: a FULL model whose base weights are not the site's own
    (a coordinator swapping the model it fine-tunes) is refused, whatever hash it names."""
    lora = lora_spec(base)
    b = lora_server(other_base, initial=False)
    with pytest.raises(PayloadError, match="the full model's frozen base hashes to") as caught:
        receive_model(b.full(1), held=None, run="r", base=base, shapes=shapes(base, lora), lora=lora)
    assert caught.value.reason == "wrong-base"
    # the site's own base in full is taken
    own = lora_server(base, initial=False)
    held = receive_model(own.full(1), held=None, run="r", base=base, shapes=shapes(base, lora), lora=lora)
    assert held.hash == own.hash


@pytest.mark.parametrize(
    "name", ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.lora_A.weight"]
)
def test_a_change_to_a_frozen_tensor_is_refused(base: BaseModel, name: str) -> None:
    """Under LoRA only B moves: a DELTA to the base or to A (drawn from the seed by every
    party, which exact aggregation relies on) is refused."""
    lora = lora_spec(base)
    s = shapes(base, lora)
    b = lora_server(base)
    held = receive_model(b.payload_for(1, 1), held=None, run="r", base=base, shapes=s, lora=lora)
    assert name in s
    change = {name: np.full(int(np.prod(s[name])), 0.01, dtype=np.float32)}
    table, _ = encode_tensors(change, {name: s[name]}, CODECS["fp16"], density=1.0, selection="global")
    forged = pack(Header(Kind.DELTA, CODECS["fp16"].codec_id, 2, held.hash, b"\x03" * 32), table)
    with pytest.raises(PayloadError, match="a change to a frozen tensor") as caught:
        receive_model(forged, held=held, run="r", base=base, shapes=s, lora=lora)
    assert caught.value.reason == "frozen-base"


def test_a_site_refuses_a_base_other_than_its_own(base: BaseModel) -> None:
    check_base(base, base.hash)
    other = "b" * 64
    refusal = rf"starts from base b{{16}}\.\.\., but this site's base folder .* hashes to {base.hash[:16]}"
    with pytest.raises(InputError, match=refusal):
        check_base(base, other)
    with pytest.raises(InputError, match="starts from no base model"):
        check_base(base, None)
