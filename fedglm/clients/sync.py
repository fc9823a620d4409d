"""How a site obtains the round's global model from a downlink payload.

The payload names the model it produces (`target`, a SHA-256 of the weights). In order:
1. the site already holds `target` (it got it with the last evaluation): nothing to apply;
2. a DELTA built on the model the site holds: apply it, and the result must hash to `target`;
3. a FULL model: take it, and it must hash to `target`;
4. INIT (round 1): build the model from the run's seed; it must hash to `target`.
Anything else raises `StaleModel`; the coordinator then sends that site the full model.

From a base model (`fedglm pretrain`), the coordinator announces the base's hash in every round
config. A site that pins a base (`base_hash` in its config) refuses any other (`check_pinned_base`).
The base itself arrives as a FULL model (round 1, or a site that lost its copy); with full
fine-tuning, a FULL model that is still the base hashes to the announced hash; with LoRA
adapters the base stays frozen, so every FULL model's non-adapter tensors must hash to it, and a
DELTA may carry adapter tensors only.

Whatever its route, the model must pass `limits.check_weights` (finite, bounded) before the
site trains on it.

Under a pruning mask, the site first slices the model it holds to the mask (`prune_held`), as
the coordinator sliced the global model, and the payload's tensors have the sliced shapes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedglm.clients.limits import check_weights
from fedglm.clients.state import HeldModel
from fedglm.compression import Kind, PayloadError, decode, model_hash
from fedglm.compression.update import apply
from fedglm.config import ModelConfig
from fedglm.errors import InputError
from fedglm.lora import LoraSpec, add_adapters, base_state, is_adapter
from fedglm.model import build_model
from fedglm.payload import STALE_MODEL
from fedglm.pruning import Mask, slice_state


class StaleModel(RuntimeError):
    """The site cannot build the round's model from what it holds and what it was sent."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"{STALE_MODEL}: {detail}")


def parse_mask(text: str, model_cfg: ModelConfig) -> Mask:
    """The round's pruning mask ("": unpruned); a bad one is a `PayloadError`."""
    args = model_cfg.glm_args()
    if not text:
        return Mask.full(args)
    try:
        return Mask.from_json(text, args)
    except ValueError as exc:
        raise PayloadError(str(exc), "bad-mask") from None


def prune_held(held: HeldModel, mask_text: str, model_cfg: ModelConfig) -> HeldModel | None:
    """`held` sliced to the round's mask; None if the mask would bring pruned parts back."""
    if held.mask == mask_text:
        return held
    args = model_cfg.glm_args()
    before, after = parse_mask(held.mask, model_cfg), parse_mask(mask_text, model_cfg)
    if not after.within(before):
        return None
    state = slice_state(held.state, args, before, after)
    return HeldModel(held.run, model_hash(state), state, mask_text)


def check_pinned_base(pinned: str | None, announced: str | None) -> None:
    """Refuse a run whose base model is not the one this site's config pins (`base_hash`)."""
    if pinned is None or pinned == announced:
        return
    offered = f"base {announced[:16]}..." if announced else "no base model (random weights)"
    raise InputError(
        f"the coordinator's run starts from {offered}, but this site accepts only base "
        f"{pinned[:16]}... (base_hash in its config): ask the coordinator which base it uses, "
        "or change base_hash"
    )


def receive_model(
    blob: bytes,
    *,
    held: HeldModel | None,
    run: str,
    model_cfg: ModelConfig,
    shapes: Mapping[str, tuple[int, ...]],
    mask_text: str = "",
    lora: LoraSpec | None = None,
    base_hash: bytes | None = None,
) -> HeldModel:
    """The round's global model; `shapes` are the tensor shapes of a model of `model_cfg`
    (with `lora` adapters) sliced to the mask `mask_text` ("": unpruned), which `held` must
    already be sliced to; `base_hash` is the announced base model's hash, if any."""
    header, tensors = decode(blob, shapes)
    target = header.target
    if held is not None and held.hash == target:
        return held
    if header.kind == Kind.DELTA:
        if held is None or held.hash != header.base:
            holds = "nothing" if held is None else held.hash.hex()[:12]
            raise StaleModel(f"the change is built on {header.base.hex()[:12]}, this site holds {holds}")
        frozen = [name for name in tensors if not is_adapter(name)]
        if lora is not None and frozen:
            raise PayloadError(f"a change to the frozen base ({frozen[0]}) under LoRA", "frozen-base")
        state = held.state
        apply(state, tensors)
    elif header.kind == Kind.FULL:
        if set(tensors) != set(shapes):
            raise PayloadError("a full model must carry every tensor", "bad-kind")
        state = {
            name: torch.from_numpy(tensors[name].dense(math.prod(shape)).reshape(shape).copy())
            for name, shape in shapes.items()
        }
        if lora is not None and base_hash is not None and not mask_text:
            _check_base(model_hash(base_state(state)), base_hash)
    elif header.kind == Kind.INIT:
        if base_hash is not None:
            raise PayloadError("the run announces a base model but sent a seed-built one", "wrong-base")
        args = model_cfg.glm_args()
        model = build_model(args, model_cfg.init_seed)
        if lora is not None:
            add_adapters(model, lora)
        state = slice_state(dict(model.state_dict()), args, Mask.full(args), parse_mask(mask_text, model_cfg))
    else:
        raise PayloadError(f"a {header.kind.name} payload cannot carry a global model", "bad-kind")
    check_weights(state)
    new_hash = model_hash(state)
    if new_hash != target:
        raise StaleModel(
            f"the model built from a {header.kind.name} payload hashes to "
            f"{new_hash.hex()[:12]}, not {target.hex()[:12]}"
        )
    return HeldModel(run, new_hash, state, mask_text)


def _check_base(received: bytes, announced: bytes) -> None:
    if received != announced:
        raise PayloadError(
            f"the base model received hashes to {received.hex()[:16]}..., the coordinator announced "
            f"{announced.hex()[:16]}...",
            "wrong-base",
        )
