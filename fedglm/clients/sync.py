"""How a site obtains the round's global model from a downlink payload.

The payload names the model it produces (`target`, a SHA-256 of the weights). In order:
1. the site already holds `target` (it got it with the last evaluation): nothing to apply;
2. a DELTA built on the model the site holds: apply it, and the result must hash to `target`;
3. a FULL model: take it, and it must hash to `target`;
4. INIT (round 1): build the model from the site's own base folder (`models/base.py`: its
   weights, the adapters drawn from the run's seed, sliced to the mask); it must hash to `target`.
Anything else raises `StaleModel`; the coordinator then sends that site the full model.

The coordinator announces the base folder's hash in every round config, and a site whose own
folder hashes otherwise refuses the run (`check_base`): the base never crosses the network and
the coordinator cannot swap it. With LoRA adapters the base stays frozen, so a FULL model's
tensors other than the adapters' B (the base, and A drawn from the run's seed) must equal what
the site builds itself (sliced to the mask), and a DELTA may carry B tensors only.

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
from fedglm.errors import InputError
from fedglm.models.base import BaseModel
from fedglm.models.families import Shape
from fedglm.models.lora import LoraSpec, is_trained_adapter, wire_state
from fedglm.models.pruning import Mask, slice_state
from fedglm.payload import STALE_MODEL


class StaleModel(RuntimeError):
    """The site cannot build the round's model from what it holds and what it was sent."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"{STALE_MODEL}: {detail}")


def parse_mask(text: str, shape: Shape) -> Mask:
    """The round's pruning mask ("": unpruned); a bad one is a `PayloadError`."""
    if not text:
        return Mask.full(shape)
    try:
        return Mask.from_json(text, shape)
    except ValueError as exc:
        raise PayloadError(str(exc), "bad-mask") from None


def prune_held(held: HeldModel, mask_text: str, base: BaseModel) -> HeldModel | None:
    """`held` sliced to the round's mask; None if the mask would bring pruned parts back."""
    if held.mask == mask_text:
        return held
    before, after = parse_mask(held.mask, base.shape), parse_mask(mask_text, base.shape)
    if not after.within(before):
        return None
    state = slice_state(held.state, base.shape, base.family, before, after)
    return HeldModel(held.run, model_hash(state), state, mask_text)


def check_base(base: BaseModel, announced: str | None) -> None:
    """Refuse a run whose base is not this site's own folder (by hash)."""
    if announced == base.hash:
        return
    offered = f"base {announced[:16]}..." if announced else "no base model"
    raise InputError(
        f"the coordinator's run starts from {offered}, but this site's base folder {base.folder} hashes "
        f"to {base.hash[:16]}...: ask the coordinator which base it uses, and point base: at a copy of it"
    )


def receive_model(
    blob: bytes,
    *,
    held: HeldModel | None,
    run: str,
    base: BaseModel,
    shapes: Mapping[str, tuple[int, ...]],
    mask_text: str = "",
    lora: LoraSpec | None = None,
) -> HeldModel:
    """The round's global model; `shapes` are the tensor shapes of `base` (with `lora` adapters)
    sliced to the mask `mask_text` ("": unpruned), which `held` must already be sliced to."""
    header, tensors = decode(blob, shapes)
    target = header.target
    if held is not None and held.hash == target:
        return held
    mask = parse_mask(mask_text, base.shape)
    if header.kind == Kind.DELTA:
        if held is None or held.hash != header.base:
            holds = "nothing" if held is None else held.hash.hex()[:12]
            raise StaleModel(f"the change is built on {header.base.hex()[:12]}, this site holds {holds}")
        frozen = [name for name in tensors if not is_trained_adapter(name)]
        if lora is not None and frozen:
            raise PayloadError(f"a change to a frozen tensor ({frozen[0]}) under LoRA", "frozen-base")
        state = held.state
        apply(state, tensors)
    elif header.kind == Kind.FULL:
        if set(tensors) != set(shapes):
            raise PayloadError("a full model must carry every tensor", "bad-kind")
        state = {
            name: torch.from_numpy(tensors[name].dense(math.prod(shape)).reshape(shape).copy())
            for name, shape in shapes.items()
        }
        if lora is not None:  # everything but B is frozen: it must be what this site builds itself
            own = {
                n: t
                for n, t in wire_state(base.build(lora=lora, mask=mask)).items()
                if not is_trained_adapter(n)
            }
            _check_base(
                model_hash({n: t for n, t in state.items() if not is_trained_adapter(n)}), model_hash(own)
            )
    elif header.kind == Kind.INIT:
        state = dict(wire_state(base.build(lora=lora, mask=mask)))
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
            f"the full model's frozen base hashes to {received.hex()[:16]}..., this site's base to "
            f"{announced.hex()[:16]}...",
            "wrong-base",
        )
