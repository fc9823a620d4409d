"""The global model as every client holds it, and what the server sends to move them forward.

The server keeps the broadcast model B (bit-identical to each client's copy) and a downlink
residual e. After a round's updates are averaged into U, the server compresses U + e, keeps
what it did not send in e (server-side error feedback), and applies to B exactly what it sends:
B' = B + decode(payload). Every downlink payload names the hash of the model it produces.

What a node is sent depends on what it is known to hold (learnt from its last good reply):
- B itself: an empty DELTA (B to B, a header and no tensors);
- the previous B: the round's DELTA, one payload shared by all such nodes;
- anything else, or unknown: INIT while B is still the seed-built initial model, else FULL.
A node that answers `stale-model` is forgotten and sent FULL.

With LoRA adapters (`trainable`: the adapter tensors), only those tensors move: updates, the
residual and every DELTA cover them alone, and the frozen base reaches a node only inside a
FULL model, the first time.

Pruning (`reshape`) slices B and e the way every site slices its own copy when it reads the new
mask, so a node that held B holds the sliced B once it has applied the mask.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import TypeAlias

import numpy as np
import torch

from fedglm.compression import CODECS, NO_HASH, Codec, Header, Kind, model_hash
from fedglm.compression.update import Selection, Table, apply, encode_tensors
from fedglm.compression.wire import pack

State: TypeAlias = dict[str, torch.Tensor]


class Broadcast:
    def __init__(
        self,
        state: dict[str, torch.Tensor],
        *,
        residual: dict[str, torch.Tensor] | None = None,
        initial: bool = False,
        trainable: Collection[str] | None = None,
    ) -> None:
        self.state = {name: t.detach().to(torch.float32).contiguous().clone() for name, t in state.items()}
        self.trainable = list(self.state) if trainable is None else [n for n in self.state if n in trainable]
        self.shapes = {name: tuple(t.shape) for name, t in self.state.items()}
        self.residual = residual or {name: torch.zeros_like(self.state[name]) for name in self.trainable}
        self.hash = model_hash(self.state)
        self.initial = initial
        self.previous: bytes | None = None
        self.delta: bytes | None = None
        self.holders: dict[int, bytes] = {}
        self._cache: dict[tuple[Kind, int], bytes] = {}

    def payload_for(self, node: int, server_round: int) -> bytes:
        """The payload that brings `node` to the current model (the same object for equal cases)."""
        held = self.holders.get(node)
        if held is not None and held == self.previous and self.delta is not None:
            return self.delta
        if held == self.hash:
            return self._cached(Kind.DELTA, server_round, lambda: [], base=self.hash)
        if self.initial:
            return self._cached(Kind.INIT, server_round, lambda: [])
        return self.full(server_round)

    def full(self, server_round: int) -> bytes:
        codec = CODECS["dense"]
        return self._cached(
            Kind.FULL,
            server_round,
            lambda: [
                (name, self.shapes[name], t.view(-1).numpy().astype("<f4").tobytes())
                for name, t in self.state.items()
            ],
            codec_id=codec.codec_id,
        )

    def _cached(
        self,
        kind: Kind,
        server_round: int,
        tensors: Callable[[], Table],
        *,
        base: bytes = NO_HASH,
        codec_id: int = 0,
    ) -> bytes:
        key = (kind, server_round)
        if key not in self._cache:
            self._cache[key] = pack(Header(kind, codec_id, server_round, base, self.hash), tensors())
        return self._cache[key]

    def holds(self, node: int) -> None:
        """`node` replied to a message that carried the current model: it holds it now."""
        self.holders[node] = self.hash

    def forget(self, node: int) -> None:
        self.holders.pop(node, None)

    def reshape(self, transform: Callable[[State], State]) -> None:
        """Apply `transform` (pruning's slicing) to B and e; nodes that held B hold the result."""
        old = self.hash
        self.state = transform(self.state)
        self.residual = transform(self.residual)
        self.shapes = {name: tuple(t.shape) for name, t in self.state.items()}
        self.hash = model_hash(self.state)
        self.holders = {node: self.hash for node, held in self.holders.items() if held == old}
        self.previous = self.delta = None
        self._cache.clear()

    @property
    def update_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shapes of the tensors an update (and a DELTA) may carry."""
        return {name: self.shapes[name] for name in self.trainable}

    def advance(
        self,
        update: Mapping[str, np.ndarray],
        server_round: int,
        *,
        codec: Codec,
        density: float,
        selection: Selection,
    ) -> None:
        """Move B by the compressed `update` + residual; `update` (flat fp32) is consumed."""
        shapes = self.update_shapes
        values = {name: update[name] for name in shapes}
        for name, array in values.items():
            array += self.residual[name].view(-1).numpy()
        table, decoded = encode_tensors(values, shapes, codec, density=density, selection=selection)
        for name, array in values.items():
            self.residual[name].view(-1).numpy()[:] = array
        apply(self.state, decoded)
        self.previous, self.hash = self.hash, model_hash(self.state)
        self.delta = pack(Header(Kind.DELTA, codec.codec_id, server_round, self.previous, self.hash), table)
        self.initial = False
        self._cache.clear()
