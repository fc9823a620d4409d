import numpy as np
import torch

from fedglm.compression import CODECS, Kind, decode, model_hash
from fedglm.compression.update import apply
from fedglm.compression.wire import read_header
from fedglm.server.broadcast import Broadcast

SHAPES = {"w": (8, 16), "b": (16,)}


def start() -> Broadcast:
    g = torch.Generator().manual_seed(0)
    return Broadcast({n: torch.randn(s, generator=g) for n, s in SHAPES.items()}, initial=True)


def aggregate(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(int(np.prod(s))).astype(np.float32) for n, s in SHAPES.items()}


def test_payload_depends_on_what_the_node_holds() -> None:
    b = start()
    assert read_header(b.payload_for(1, 1)).kind == Kind.INIT
    b.holds(1)
    initial = b.hash
    b.advance(aggregate(0), 1, codec=CODECS["topk"], density=0.1, selection="global")
    assert b.previous == initial and b.hash != initial
    assert b.payload_for(1, 1) is b.delta  # node 1 holds the previous model
    assert read_header(b.payload_for(2, 1)).kind == Kind.FULL  # node 2 holds nothing known
    b.holds(1)
    hold = read_header(b.payload_for(1, 2))
    assert (hold.kind, hold.base, hold.target) == (Kind.DELTA, b.hash, b.hash)
    b.forget(1)
    assert read_header(b.payload_for(1, 2)).kind == Kind.FULL


def test_client_applying_the_delta_holds_the_bit_identical_model() -> None:
    b = start()
    client = {n: t.clone() for n, t in b.state.items()}
    for r in range(1, 4):
        b.advance(aggregate(r), r, codec=CODECS["topk"], density=0.05, selection="global")
        assert b.delta is not None
        header, tensors = decode(b.delta, SHAPES)
        assert header.base == model_hash(client)
        apply(client, tensors)
        assert model_hash(client) == header.target == b.hash


def test_server_error_feedback_keeps_what_it_did_not_send() -> None:
    b = start()
    before = {n: t.clone() for n, t in b.state.items()}
    agg = aggregate(7)
    expected = {n: a.copy() for n, a in agg.items()}
    b.advance(agg, 1, codec=CODECS["topk"], density=0.1, selection="per-tensor")
    assert b.delta is not None
    _, sent = decode(b.delta, SHAPES)
    for name in SHAPES:
        assert np.array_equal(
            sent[name].dense(expected[name].size) + b.residual[name].view(-1).numpy(), expected[name]
        )
        assert torch.equal(
            b.state[name].view(-1)[torch.from_numpy(sent[name].positions)],
            (
                before[name].view(-1)[torch.from_numpy(sent[name].positions)]
                + torch.from_numpy(sent[name].values)
            ),
        )
