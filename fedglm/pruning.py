"""Coordinated structured pruning: which attention heads and SwiGLU channels the federation keeps.

A `Mask` lists, for every layer, the heads and channels that are kept, as indices into the
unpruned model of the run's config. The coordinator owns it:
- At a round named in `federation.pruning.schedule`, the server ranks the heads and channels of
  the aggregated global model (`importance`) and keeps, in every layer, the most important
  `1 - fraction` of the unpruned count (`choose_mask`; at least one head and one channel).
  Ranking uses only the global model's weights, which are post-processing of the sites' DP
  releases: pruning spends no privacy and reads no site's records.
- The mask goes to every site in the round config (`RoundConfig.mask`, `protocol.py`). Both
  sides apply it the same way, by slicing the model physically (`slice_state`): the pruned
  parts are gone, so they are neither trained nor sent, every payload shrinks by what was
  cut, and a site's training runs on the smaller model. Masks only ever shrink, so a site can
  go from any earlier mask to the current one.
- Slicing is exact: a sliced model gives the same logits as the unpruned model with the pruned
  heads and channels zeroed (`zero_pruned`), which is what the tests check.

Importance (data-free, from weights): a head's score is the product of the Frobenius norms of
its value and output slices, which bounds what it adds to the residual stream; a channel's is the
product of the norms of its gate row, up row and down column.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import torch

from fedglm.model import GLM, GLMArgs

_ATTN = "blocks.{}.attn.{}_proj.weight"
_MLP = "blocks.{}.mlp.{}_proj.weight"


@dataclass(frozen=True)
class Mask:
    """Kept heads and channels of each layer, as sorted indices into the unpruned model."""

    heads: tuple[tuple[int, ...], ...]
    channels: tuple[tuple[int, ...], ...]

    @classmethod
    def full(cls, args: GLMArgs) -> Mask:
        """Everything of a model of shape `args` kept."""
        return cls(
            heads=tuple(tuple(range(args.heads(layer))) for layer in range(args.n_layers)),
            channels=tuple(tuple(range(args.ff(layer))) for layer in range(args.n_layers)),
        )

    def shape(self, args: GLMArgs) -> GLMArgs:
        """The sliced model's args, from the unpruned `args`."""
        return replace(
            args,
            layer_heads=tuple(len(h) for h in self.heads),
            layer_ff=tuple(len(c) for c in self.channels),
        )

    def kept(self) -> tuple[int, int]:
        """(heads, channels) kept over all layers."""
        return sum(len(h) for h in self.heads), sum(len(c) for c in self.channels)

    def to_json(self) -> str:
        """Compact and canonical: each layer's kept set as a hexadecimal bitmap (bit i: index i)."""
        return json.dumps(
            {"heads": [_bitmap(h) for h in self.heads], "channels": [_bitmap(c) for c in self.channels]},
            separators=(",", ":"),
        )

    def within(self, outer: Mask) -> bool:
        return all(
            set(inner) <= set(out)
            for inners, outs in ((self.heads, outer.heads), (self.channels, outer.channels))
            for inner, out in zip(inners, outs, strict=True)
        )

    @classmethod
    def from_json(cls, text: str, args: GLMArgs) -> Mask:
        """A mask for a model of the unpruned `args`; ValueError naming what is wrong."""
        try:
            data = json.loads(text)
            heads, channels = data["heads"], data["channels"]
        except (ValueError, TypeError, KeyError):
            raise ValueError("the pruning mask is not JSON with 'heads' and 'channels'") from None
        return cls(
            heads=_from_bitmaps(heads, args.n_layers, args.n_heads, "heads"),
            channels=_from_bitmaps(channels, args.n_layers, args.d_ff, "channels"),
        )


def _bitmap(kept: tuple[int, ...]) -> str:
    return format(sum(1 << i for i in kept), "x")


def _from_bitmaps(value: object, layers: int, limit: int, what: str) -> tuple[tuple[int, ...], ...]:
    if not isinstance(value, list) or len(value) != layers:
        raise ValueError(f"the pruning mask's {what} must list {layers} layers")
    out = []
    for layer, bitmap in enumerate(value):
        try:
            bits = int(bitmap, 16) if isinstance(bitmap, str) and len(bitmap) <= limit else -1
        except ValueError:
            bits = -1
        if bits <= 0 or bits >= 1 << limit:
            raise ValueError(
                f"the pruning mask's {what} of layer {layer} must be a non-empty hexadecimal "
                f"bitmap of {limit} bits"
            )
        out.append(tuple(i for i in range(limit) if bits >> i & 1))
    return tuple(out)


def _positions(inner: tuple[int, ...], outer: tuple[int, ...]) -> list[int]:
    where = {index: pos for pos, index in enumerate(outer)}
    return [where[index] for index in inner]


def slice_state(
    state: dict[str, torch.Tensor], args: GLMArgs, held: Mask, target: Mask
) -> dict[str, torch.Tensor]:
    """Weights of a model sliced to `held` (unpruned shape `args`), sliced further to `target`.

    LoRA adapters are sliced with the weight they adapt (B's rows with W's rows, A's columns
    with W's columns). Tensors missing from `state` are skipped, so a residual or update that
    covers only some tensors slices too. Tensors that do not change are shared, not copied;
    `target` must lie within `held`.
    """
    if not target.within(held):
        raise ValueError("a pruning mask can only remove heads and channels, not bring them back")
    out = dict(state)
    hd = args.head_dim
    for layer in range(args.n_layers):
        heads = _positions(target.heads[layer], held.heads[layer])
        if len(heads) != len(held.heads[layer]):
            rows = torch.tensor([h * hd + i for h in heads for i in range(hd)])
            for proj in ("q", "k", "v"):
                _cut(out, _ATTN.format(layer, proj), 0, rows)
            _cut(out, _ATTN.format(layer, "o"), 1, rows)
        channels = _positions(target.channels[layer], held.channels[layer])
        if len(channels) != len(held.channels[layer]):
            index = torch.tensor(channels)
            for proj in ("gate", "up"):
                _cut(out, _MLP.format(layer, proj), 0, index)
            _cut(out, _MLP.format(layer, "down"), 1, index)
    return out


def _cut(state: dict[str, torch.Tensor], weight: str, dim: int, index: torch.Tensor) -> None:
    """Keep `index` along `dim` of `weight` (rows: 0, columns: 1) and of its LoRA adapter."""
    prefix = weight.removesuffix(".weight")
    adapter = f"{prefix}.lora_b.weight" if dim == 0 else f"{prefix}.lora_a.weight"
    for name in (weight, adapter):
        if name in state:
            state[name] = state[name].index_select(dim, index).contiguous()


def slice_model(model: GLM, args: GLMArgs, held: Mask, target: Mask) -> GLM:
    """A new, smaller model: `model` (sliced to `held` from unpruned `args`) sliced to `target`."""
    sliced = GLM(target.shape(args))
    sliced.load_state_dict(slice_state(dict(model.state_dict()), args, held, target))
    return sliced


@torch.no_grad()
def zero_pruned(model: GLM, mask: Mask) -> None:
    """Zero, in an unpruned `model`, every weight of the heads and channels `mask` removes."""
    args = model.args
    hd = args.head_dim
    state = model.state_dict()
    for layer in range(args.n_layers):
        for head in set(range(args.n_heads)) - set(mask.heads[layer]):
            rows = slice(head * hd, (head + 1) * hd)
            for proj in ("q", "k", "v"):
                state[_ATTN.format(layer, proj)][rows] = 0.0
            state[_ATTN.format(layer, "o")][:, rows] = 0.0
        dropped = sorted(set(range(args.d_ff)) - set(mask.channels[layer]))
        if dropped:
            index = torch.tensor(dropped)
            state[_MLP.format(layer, "gate")][index] = 0.0
            state[_MLP.format(layer, "up")][index] = 0.0
            state[_MLP.format(layer, "down")][:, index] = 0.0


@torch.no_grad()
def importance(
    state: dict[str, torch.Tensor], args: GLMArgs
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, a score for each head and each channel of the model `state` (shape `args`)."""
    head_scores, channel_scores = [], []
    for layer in range(args.n_layers):
        v = state[_ATTN.format(layer, "v")].float()
        o = state[_ATTN.format(layer, "o")].float()
        n = v.shape[0] // args.head_dim
        v_norm = v.reshape(n, -1).norm(dim=1)
        o_norm = o.reshape(o.shape[0], n, args.head_dim).transpose(0, 1).reshape(n, -1).norm(dim=1)
        head_scores.append(v_norm * o_norm)
        gate = state[_MLP.format(layer, "gate")].float().norm(dim=1)
        up = state[_MLP.format(layer, "up")].float().norm(dim=1)
        down = state[_MLP.format(layer, "down")].float().norm(dim=0)
        channel_scores.append(gate * up * down)
    return head_scores, channel_scores


def _keep(scores: torch.Tensor, current: tuple[int, ...], count: int) -> tuple[int, ...]:
    if count >= len(current):
        return current
    # Ties break towards the lower index, so every party computing this gets the same mask.
    order = sorted(range(len(current)), key=lambda i: (-float(scores[i]), i))
    return tuple(sorted(current[i] for i in order[:count]))


def choose_mask(
    state: dict[str, torch.Tensor],
    args: GLMArgs,
    current: Mask,
    *,
    heads: float,
    channels: float,
    of_current: bool = False,
) -> Mask:
    """The mask that removes `heads` and `channels` in every layer by the weights of `state`,
    a model sliced to `current` from `args`. The fractions are of the unpruned counts
    (`args.n_heads`, `args.d_ff`), or of what `current` keeps with `of_current`."""
    head_scores, channel_scores = importance(state, current.shape(args))

    def count(fraction: float, whole: int, kept: tuple[int, ...]) -> int:
        return max(1, round((len(kept) if of_current else whole) * (1.0 - fraction)))

    layers = range(args.n_layers)
    return Mask(
        heads=tuple(
            _keep(head_scores[i], current.heads[i], count(heads, args.n_heads, current.heads[i]))
            for i in layers
        ),
        channels=tuple(
            _keep(channel_scores[i], current.channels[i], count(channels, args.d_ff, current.channels[i]))
            for i in layers
        ),
    )
