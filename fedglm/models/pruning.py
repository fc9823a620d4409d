"""Coordinated structured pruning of a Hugging Face causal LM: which query heads and MLP channels stay.

The design is that of `fedglm/pruning.py`, for the families of `families.py`:
- The coordinator ranks the heads and channels of the aggregated global model from its weights
  only (`importance`; post-processing of DP releases: no privacy spent, no record read) and keeps,
  in every layer, the most important `1 - fraction` of the unpruned count (`choose_mask`).
- The `Mask` travels to the sites in the round config as compact JSON (`to_json`, `from_json`,
  which checks everything, since it arrives from the network). Both sides slice state dicts
  physically (`slice_state`) and build the smaller model from `pruned_config`. Masks only ever
  shrink, so a site can go from any earlier mask to the current one.
- Slicing is exact: the sliced model gives the logits of the unpruned model with the pruned heads
  and channels zeroed (`zero_pruned`), which is what the tests check for every family.

What a Hugging Face config allows decides the mask's form:
- One size for all layers: every layer keeps the same number of heads and of channels (a folder
  with per-layer sizes fails to load, or with `ignore_mismatched_sizes` is silently re-initialised).
- Grouped-query attention: key/value heads are never pruned; query heads are pruned inside each
  KV group, the same number kept in every group, so the sliced model keeps `num_key_value_heads`
  and its query head `j * kept_per_group + k` still reads KV head `j`.
- `LlamaConfig` refuses `hidden_size % num_attention_heads != 0` even with an explicit `head_dim`,
  when the config is built, saved and loaded; a Llama mask keeping such a head count is refused
  with a ValueError (`choose_mask`, `pruned_config`). GLM, GLM-4 and Qwen2 configs have no such rule.

Importance (data-free, from weights): a query head's score is the Frobenius norm of its q_proj rows
(bias included) times that of its o_proj columns: a bound on how far the head can move the residual
stream, up to the attention pattern it selects. A channel's score is the product of the norms of its
gate row, up row and down column: a bound on its SwiGLU output for a unit input. Ties break towards
the lower index, so the mask is deterministic.

Tensors are named as transformers names them (`model.layers.0.self_attn.q_proj.weight`); LoRA
adapters as on fedglm's wire (`<module>.lora_A.weight`, r x in; `<module>.lora_B.weight`, out x r).
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedglm.models.families import ATTENTION, MLP, Family, Shape, family_of, shape_of

_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class Mask:
    """Kept query heads and MLP channels of each layer, as sorted indices into the unpruned model."""

    heads: tuple[tuple[int, ...], ...]
    channels: tuple[tuple[int, ...], ...]

    @classmethod
    def full(cls, shape: Shape) -> Mask:
        """Everything of a model of the unpruned `shape` kept."""
        return cls(
            heads=tuple(tuple(range(shape.heads)) for _ in range(shape.layers)),
            channels=tuple(tuple(range(shape.channels)) for _ in range(shape.layers)),
        )

    def kept(self) -> tuple[int, int]:
        """(query heads, channels) kept per layer: the same in every layer."""
        if not self.heads or not self.channels:
            return 0, 0
        return len(self.heads[0]), len(self.channels[0])

    def within(self, outer: Mask) -> bool:
        """Whether this mask keeps nothing that `outer` removed."""
        return (
            len(self.heads) == len(outer.heads)
            and len(self.channels) == len(outer.channels)
            and all(set(inner) <= set(out) for inner, out in zip(self.heads, outer.heads, strict=True))
            and all(set(inner) <= set(out) for inner, out in zip(self.channels, outer.channels, strict=True))
        )

    def to_json(self) -> str:
        """Compact and canonical: each layer's kept set as a lowercase hexadecimal bitmap (bit i: index i)."""
        return json.dumps(
            {"heads": [_bitmap(h) for h in self.heads], "channels": [_bitmap(c) for c in self.channels]},
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str, shape: Shape) -> Mask:
        """A mask for a model of the unpruned `shape`, from `to_json`'s text; ValueError naming the fault."""
        if not isinstance(text, str):
            raise ValueError(f"the pruning mask must be JSON text, not {type(text).__name__}")
        limit = _max_json_length(shape)
        if len(text) > limit:
            raise ValueError(
                f"the pruning mask is {len(text)} characters, over the {limit} a mask of this model takes"
            )
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            raise ValueError("the pruning mask is not valid JSON") from None
        if not isinstance(data, dict) or set(data) != {"heads", "channels"}:
            raise ValueError("the pruning mask must be a JSON object with exactly 'heads' and 'channels'")
        mask = cls(
            heads=_from_bitmaps(data["heads"], shape.layers, shape.heads, "heads"),
            channels=_from_bitmaps(data["channels"], shape.layers, shape.channels, "channels"),
        )
        check_mask(mask, shape)
        return mask


def _bitmap(kept: Iterable[int]) -> str:
    return format(sum(1 << i for i in kept), "x")


def _max_json_length(shape: Shape) -> int:
    per_layer = math.ceil(shape.heads / 4) + math.ceil(shape.channels / 4) + 6  # two quoted strings, commas
    return 32 + shape.layers * per_layer


def _from_bitmaps(value: object, layers: int, limit: int, what: str) -> tuple[tuple[int, ...], ...]:
    if not isinstance(value, list) or len(value) != layers:
        got = f"{len(value)} entries" if isinstance(value, list) else type(value).__name__
        raise ValueError(f"the pruning mask's {what} must list {layers} layers, got {got}")
    out = []
    for layer, bitmap in enumerate(value):
        if not isinstance(bitmap, str) or _HEX.fullmatch(bitmap) is None:
            raise ValueError(
                f"the pruning mask's {what} of layer {layer} must be a lowercase hexadecimal string, "
                f"got {str(bitmap)[:20]!r}"
            )
        bits = int(bitmap, 16)
        if bits == 0:
            raise ValueError(f"the pruning mask keeps no {what} in layer {layer}; at least one must stay")
        if bits >> limit:
            raise ValueError(
                f"the pruning mask's {what} of layer {layer} names index {bits.bit_length() - 1}, "
                f"out of range for a model of {limit}"
            )
        out.append(tuple(i for i in range(limit) if bits >> i & 1))
    return tuple(out)


def check_mask(mask: Mask, shape: Shape) -> None:
    """ValueError naming what is wrong if `mask` does not fit a model of the unpruned `shape`."""
    for what, kept, limit in (
        ("heads", mask.heads, shape.heads),
        ("channels", mask.channels, shape.channels),
    ):
        if len(kept) != shape.layers:
            raise ValueError(
                f"the pruning mask's {what} list {len(kept)} layers, the model has {shape.layers}"
            )
        for layer, indices in enumerate(kept):
            if not indices:
                raise ValueError(f"the pruning mask keeps no {what} in layer {layer}; at least one must stay")
            if list(indices) != sorted(set(indices)):
                raise ValueError(f"the pruning mask's {what} of layer {layer} are not sorted and distinct")
            if indices[0] < 0 or indices[-1] >= limit:
                raise ValueError(
                    f"the pruning mask's {what} of layer {layer} name an index out of range 0..{limit - 1}"
                )
            if len(indices) != len(kept[0]):
                raise ValueError(
                    f"the pruning mask keeps {len(kept[0])} {what} in layer 0 but {len(indices)} in layer "
                    f"{layer}; a Hugging Face config has one size for every layer"
                )
    for layer, heads in enumerate(mask.heads):
        per_group = [sum(1 for h in heads if h // shape.group == g) for g in range(shape.kv_heads)]
        if len(set(per_group)) != 1:
            raise ValueError(
                f"the pruning mask keeps {per_group} query heads in the key/value groups of layer {layer}; "
                "every group must keep the same number"
            )


def check_loadable(shape: Shape, family: Family, heads: int) -> None:
    """ValueError if a model of `family` with `heads` query heads cannot be saved or loaded."""
    if family.model_type == "llama" and shape.hidden % heads != 0:
        valid = [
            n * shape.kv_heads for n in range(1, shape.group + 1) if shape.hidden % (n * shape.kv_heads) == 0
        ]
        raise ValueError(
            f"a pruned Llama model with {heads} query heads cannot be saved or loaded: LlamaConfig requires "
            f"hidden_size ({shape.hidden}) to be a multiple of num_attention_heads; keep one of {valid} heads"
        )


def pruned_config(config: Any, mask: Mask) -> Any:
    """A deep copy of the unpruned transformers `config` for the model sliced to `mask`."""
    shape, family = shape_of(config), family_of(config)
    check_mask(mask, shape)
    heads, channels = mask.kept()
    check_loadable(shape, family, heads)
    new = copy.deepcopy(config)
    new.head_dim = shape.head_dim  # explicit: a default of hidden // heads would change with the heads
    new.num_attention_heads = heads
    new.intermediate_size = channels
    validate = getattr(new, "validate", None)
    if callable(validate):
        try:
            validate()
        except Exception as exc:  # transformers raises its own strict-dataclass errors
            raise ValueError(
                f"{family.architecture} refuses {heads} heads and {channels} channels: "
                f"{str(exc).splitlines()[-1].strip()[:200]}"
            ) from None
    return new


def _positions(inner: tuple[int, ...], outer: tuple[int, ...]) -> list[int]:
    where = {index: pos for pos, index in enumerate(outer)}
    return [where[index] for index in inner]


def slice_state(
    state: dict[str, torch.Tensor], shape: Shape, family: Family, held: Mask, target: Mask
) -> dict[str, torch.Tensor]:
    """`state`, a model (unpruned shape `shape`) sliced to `held`, sliced further to `target`.

    Slices q_proj rows (and bias), o_proj columns, the MLP channels' rows of gate/up (fused
    `gate_up_proj`: rows `c` and `c + I`, I the held channel count) and down_proj columns, and
    LoRA adapters with the weight they adapt: lora_B rows with output rows, lora_A columns with
    input columns. Tensors missing from `state` are skipped (an update may cover only some);
    tensors that do not change are passed through, not copied. Returns a new dict.
    """
    check_mask(held, shape)
    check_mask(target, shape)
    if not target.within(held):
        raise ValueError("a pruning mask can only remove heads and channels, not bring them back")
    out = dict(state)
    hd = shape.head_dim
    for layer in range(shape.layers):
        held_heads = held.heads[layer]
        heads = _positions(target.heads[layer], held_heads)
        if len(heads) != len(held_heads):
            rows = torch.tensor([h * hd + i for h in heads for i in range(hd)])
            size = len(held_heads) * hd
            _cut(out, ATTENTION.format(layer=layer, proj="q_proj"), 0, rows, size)
            _cut(out, ATTENTION.format(layer=layer, proj="o_proj"), 1, rows, size)
        held_channels = len(held.channels[layer])
        channels = _positions(target.channels[layer], held.channels[layer])
        if len(channels) != held_channels:
            index = torch.tensor(channels)
            if family.fused_gate_up:
                both = torch.cat([index, index + held_channels])
                _cut(out, MLP.format(layer=layer, proj="gate_up_proj"), 0, both, 2 * held_channels)
            else:
                for proj in ("gate_proj", "up_proj"):
                    _cut(out, MLP.format(layer=layer, proj=proj), 0, index, held_channels)
            _cut(out, MLP.format(layer=layer, proj="down_proj"), 1, index, held_channels)
    return out


def _cut(state: dict[str, torch.Tensor], module: str, dim: int, index: torch.Tensor, size: int) -> None:
    """Keep `index` of `module`'s outputs (dim 0) or inputs (dim 1), in its weight, bias and adapter."""
    if dim == 0:
        names = [(f"{module}.weight", 0), (f"{module}.bias", 0), (f"{module}.lora_B.weight", 0)]
    else:
        names = [(f"{module}.weight", 1), (f"{module}.lora_A.weight", 1)]
    for name, axis in names:
        tensor = state.get(name)
        if tensor is None:
            continue
        if tensor.dim() <= axis or tensor.shape[axis] != size:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected {size} along dimension {axis} for the "
                "held mask; the state was sliced to a different mask"
            )
        state[name] = tensor.index_select(axis, index).contiguous()


@torch.no_grad()
def importance(
    state: dict[str, torch.Tensor], shape: Shape, family: Family
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (float32) of the heads and channels `state` holds: ([layers, heads], [layers, channels]).

    `state` may be sliced to any mask: the scores follow its heads and channels in order.
    """
    hd = shape.head_dim
    head_scores, channel_scores = [], []
    for layer in range(shape.layers):
        q_name = ATTENTION.format(layer=layer, proj="q_proj")
        q = state[f"{q_name}.weight"].float()
        if f"{q_name}.bias" in state:
            q = torch.cat([q, state[f"{q_name}.bias"].float().unsqueeze(1)], dim=1)
        o = state[ATTENTION.format(layer=layer, proj="o_proj") + ".weight"].float()
        heads = q.shape[0] // hd
        q_norm = q.reshape(heads, -1).norm(dim=1)
        o_norm = o.reshape(o.shape[0], heads, hd).transpose(0, 1).reshape(heads, -1).norm(dim=1)
        head_scores.append(q_norm * o_norm)
        if family.fused_gate_up:
            gate, up = state[MLP.format(layer=layer, proj="gate_up_proj") + ".weight"].float().chunk(2, dim=0)
        else:
            gate = state[MLP.format(layer=layer, proj="gate_proj") + ".weight"].float()
            up = state[MLP.format(layer=layer, proj="up_proj") + ".weight"].float()
        down = state[MLP.format(layer=layer, proj="down_proj") + ".weight"].float()
        channel_scores.append(gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0))
    return torch.stack(head_scores), torch.stack(channel_scores)


def _keep(scores: list[float], indices: list[int], count: int) -> list[int]:
    """The `count` best of `indices` (scores in the same order); ties and NaN go to the lower index."""
    order = sorted(
        range(len(indices)),
        key=lambda i: (-scores[i] if not math.isnan(scores[i]) else math.inf, indices[i]),
    )
    return sorted(indices[i] for i in order[:count])


def _count(whole: int, fraction: float, what: str) -> int:
    if not 0.0 <= fraction <= 1.0:  # also refuses NaN
        raise ValueError(f"the fraction of {what} to prune must be in [0, 1], got {fraction}")
    return max(1, math.floor(whole * (1.0 - fraction) + 0.5))


def choose_mask(
    state: dict[str, torch.Tensor],
    shape: Shape,
    family: Family,
    held: Mask,
    *,
    heads: float,
    channels: float,
) -> Mask:
    """The mask removing `heads` and `channels` (fractions of the unpruned counts) by the weights of
    `state`, a model of unpruned `shape` sliced to `held`. Each layer keeps the same count: at least
    one query head per KV group (the same number in every group) and one channel, never more than
    `held` keeps."""
    check_mask(held, shape)
    per_group = min(_count(shape.group, heads, "heads"), len(held.heads[0]) // shape.kv_heads)
    keep_channels = min(_count(shape.channels, channels, "channels"), len(held.channels[0]))
    check_loadable(shape, family, per_group * shape.kv_heads)
    head_scores, channel_scores = importance(state, shape, family)
    if head_scores.shape[1] != len(held.heads[0]) or channel_scores.shape[1] != len(held.channels[0]):
        raise ValueError(
            f"the state holds {head_scores.shape[1]} heads and {channel_scores.shape[1]} channels per layer, "
            f"the held mask {held.kept()[0]} and {held.kept()[1]}"
        )
    kept_heads, kept_channels = [], []
    for layer in range(shape.layers):
        scores = head_scores[layer].tolist()
        layer_heads: list[int] = []
        for group in range(shape.kv_heads):
            members = [p for p, h in enumerate(held.heads[layer]) if h // shape.group == group]
            chosen = _keep([scores[p] for p in members], [held.heads[layer][p] for p in members], per_group)
            layer_heads.extend(chosen)
        kept_heads.append(tuple(sorted(layer_heads)))
        held_channels = list(held.channels[layer])
        kept_channels.append(tuple(_keep(channel_scores[layer].tolist(), held_channels, keep_channels)))
    return Mask(heads=tuple(kept_heads), channels=tuple(kept_channels))


@torch.no_grad()
def zero_pruned(model: nn.Module, mask: Mask) -> None:
    """Zero, in an unpruned transformers `model`, the weights of the heads and channels `mask` removes,
    so that it computes what the sliced model does."""
    config = model.config
    shape, family = shape_of(config), family_of(config)
    check_mask(mask, shape)
    state = model.state_dict()  # tensors share the parameters' storage
    hd = shape.head_dim
    for layer in range(shape.layers):
        dropped = sorted(set(range(shape.heads)) - set(mask.heads[layer]))
        if dropped:
            rows = torch.tensor([h * hd + i for h in dropped for i in range(hd)])
            q_name = ATTENTION.format(layer=layer, proj="q_proj")
            _zero(state, f"{q_name}.weight", 0, rows)
            _zero(state, f"{q_name}.bias", 0, rows)
            _zero(state, ATTENTION.format(layer=layer, proj="o_proj") + ".weight", 1, rows)
        gone = sorted(set(range(shape.channels)) - set(mask.channels[layer]))
        if gone:
            index = torch.tensor(gone)
            inputs = (
                [("gate_up_proj", torch.cat([index, index + shape.channels]))]
                if family.fused_gate_up
                else [("gate_proj", index), ("up_proj", index)]
            )
            for proj, rows in inputs:
                _zero(state, MLP.format(layer=layer, proj=proj) + ".weight", 0, rows)
                _zero(state, MLP.format(layer=layer, proj=proj) + ".bias", 0, rows)
            _zero(state, MLP.format(layer=layer, proj="down_proj") + ".weight", 1, index)


def _zero(state: dict[str, torch.Tensor], name: str, dim: int, index: torch.Tensor) -> None:
    if name in state:
        state[name].index_fill_(dim, index, 0.0)
