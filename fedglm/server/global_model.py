"""The global model, with one owner: weights, residual, who holds which version, and the mask.

`GlobalModel` is everything the coordinator knows about the model between two rounds: the
broadcast model B and its downlink residual (`broadcast.py`), which node holds which version,
the pruning mask with the unpruned model's shape, and the LoRA scale pruning ranks with. The
strategy asks it for payloads and hands it each round's result in one call:
- `finish_train(update, server_round, trained, downlink)`: the nodes whose updates were used
  held B when they trained; then B moves by the update (and a DELTA is made for them);
- `finish_evaluate(nodes)`: the nodes that evaluated hold the new B;
- `current()`: the model the sites hold, merged, for the coordinator's own scoring;
- `checkpoint(...)`: what a restart resumes from.
The order that used to be the callers' to keep (holders of B recorded before B moves) is kept
here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO

import numpy as np
from flwr.common import log
from torch import nn

from fedglm.compression import CODECS
from fedglm.config import LinkConfig, PruningConfig
from fedglm.models.base import BaseModel
from fedglm.models.lora import merge_adapters
from fedglm.models.pruning import Mask, choose_mask, slice_state
from fedglm.server.broadcast import Broadcast
from fedglm.server.checkpoint import Checkpoint


class GlobalModel:
    """The global model and what every node holds of it; see the module docstring."""

    def __init__(
        self,
        broadcast: Broadcast,
        *,
        base: BaseModel | None = None,
        pruning: PruningConfig | None = None,
        mask: Mask | None = None,
        lora_scale: float | None = None,
    ) -> None:
        if (pruning is not None or mask is not None) and base is None:
            raise ValueError("pruning needs the unpruned model's shape (its base)")
        self.broadcast = broadcast
        self.base = base
        self.pruning = pruning or PruningConfig()
        self.mask = mask or (Mask.full(base.shape) if base is not None else None)
        self.lora_scale = lora_scale  # set when sites train LoRA adapters: rank the merged model

    @property
    def hash(self) -> bytes:
        return self.broadcast.hash

    @property
    def update_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.broadcast.update_shapes

    @property
    def mask_json(self) -> str:
        """The current pruning mask as sent to sites; "" while the model is unpruned."""
        if self.mask is None or self.base is None or self.mask == Mask.full(self.base.shape):
            return ""
        return self.mask.to_json()

    def payload_for(self, node: int, server_round: int) -> bytes:
        return self.broadcast.payload_for(node, server_round)

    def full(self, node: int, server_round: int) -> bytes:
        """The full model, for a node that answered `stale-model` (it holds nothing we know)."""
        self.broadcast.forget(node)
        return self.broadcast.full(server_round)

    def prune(self, server_round: int) -> bool:
        """Slice the model if the schedule prunes at this round; whether its shape changed."""
        step = self.pruning.step_at(server_round)
        if step is None or self.mask is None or self.base is None:
            return False
        shape, family, held = self.base.shape, self.base.family, self.mask
        state = self.broadcast.state
        ranked = state if self.lora_scale is None else merge_adapters(state, self.lora_scale)
        target = choose_mask(ranked, shape, family, held, heads=step.heads, channels=step.channels)
        if target == held:
            return False
        self.broadcast.reshape(lambda state: slice_state(state, shape, family, held, target))
        self.mask = target
        heads, channels = target.kept()
        log(
            INFO,
            "round %d: pruned the global model to %d heads and %d channels per layer",
            server_round,
            heads,
            channels,
        )
        return True

    def finish_train(
        self,
        update: Mapping[str, np.ndarray] | None,
        server_round: int,
        trained: Iterable[int],
        downlink: LinkConfig,
    ) -> None:
        """The round's aggregated `update` (flat fp32, consumed) moves the model; the `trained`
        nodes held the model before it moved. `None`: no update was used, nothing moves."""
        if update is None:
            return
        for node in trained:
            self.broadcast.holds(node)
        self.broadcast.advance(
            update,
            server_round,
            codec=CODECS[downlink.codec],
            density=downlink.density,
            selection=downlink.selection,
        )

    def finish_evaluate(self, nodes: Iterable[int]) -> None:
        """The nodes evaluated the current model: they hold it."""
        for node in nodes:
            self.broadcast.holds(node)

    def current(self) -> nn.Module:
        """The model as the sites hold it now, adapters merged, in eval mode (for scoring)."""
        if self.base is None:
            raise ValueError("the model needs its base to be built")
        return self.base.merged(self.broadcast.state, mask=self.mask, lora_scale=self.lora_scale)

    def checkpoint(self, server_round: int, *, run_key: str, fingerprint: str) -> Checkpoint:
        return Checkpoint(
            round=server_round,
            state=self.broadcast.state,
            residual=self.broadcast.residual,
            run_key=run_key,
            fingerprint=fingerprint,
            mask=self.mask_json,
        )
