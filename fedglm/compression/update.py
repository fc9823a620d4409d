"""Whole-model payloads: encode a set of tensors with error feedback, decode and check one.

`encode` takes the values to send (the model change plus last round's residual) and leaves in
the same arrays what was not sent: the new residual, exact in fp32, so that
`decoded + residual == values` bit for bit (see `codecs`). Selection is per tensor (each keeps
`density` of its values) or global (one magnitude threshold across the model, so tensors that
moved more keep more). Sparse tensors that keep nothing are left out of the payload.

`decode` parses, checks and decodes every tensor before returning anything, so a payload that
fails halfway has changed nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch

from fedglm.compression.codecs import CODEC_IDS, Codec, Decoded
from fedglm.compression.select import keep_count, sampled_threshold
from fedglm.compression.wire import MAX_NAME_BYTES, Header, Kind, PayloadError, pack, unpack

Selection = Literal["per-tensor", "global"]
Shapes = Mapping[str, tuple[int, ...]]


def model_hash(state: Mapping[str, torch.Tensor]) -> bytes:
    """SHA-256 over every tensor's name, shape and fp32 bytes, in the state dict's order."""
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(name.encode("utf-8") + repr(tuple(tensor.shape)).encode("ascii"))
        digest.update(tensor.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return digest.digest()


def payload_limit(shapes: Shapes) -> int:
    """The largest payload a model of these shapes can need (dense fp32 plus the table)."""
    values = sum(int(np.prod(s)) for s in shapes.values())
    return 4 * values + len(shapes) * (MAX_NAME_BYTES + 64) + 4096


def _global_threshold(arrays: list[np.ndarray], density: float) -> float:
    joined = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    return sampled_threshold(joined, keep_count(joined.size, density), oversample=1.0)


Table = list[tuple[str, tuple[int, ...], bytes]]


class NonFiniteUpdate(ValueError):
    """An update to encode holds NaN or infinite values."""


def encode_tensors(
    values: Mapping[str, np.ndarray],
    shapes: Shapes,
    codec: Codec,
    *,
    density: float = 1.0,
    selection: Selection = "per-tensor",
) -> tuple[Table, dict[str, Decoded]]:
    """Tensor table and decoded values for flat fp32 `values`; each array becomes its residual.

    Values that are not all finite are refused (`NonFiniteUpdate`) before anything changes: a
    sparse codec would otherwise select nothing from them and send an empty update."""
    for name, array in values.items():
        if not np.isfinite(array).all():
            raise NonFiniteUpdate(
                f"tensor {name} of the update holds NaN or infinite values; nothing is sent"
            )
    threshold = None
    if codec.sparse and selection == "global" and values:
        threshold = _global_threshold(list(values.values()), density)
    table: Table = []
    sent: dict[str, Decoded] = {}
    for name, array in values.items():
        body, decoded = codec.encode(array, density=density, threshold=threshold)
        decoded.add_to(array, -1.0)
        if codec.sparse and decoded.positions is not None and decoded.positions.size == 0:
            continue
        table.append((name, shapes[name], body))
        sent[name] = decoded
    return table, sent


def encode(
    values: Mapping[str, np.ndarray],
    shapes: Shapes,
    codec: Codec,
    header: Header,
    *,
    density: float = 1.0,
    selection: Selection = "per-tensor",
) -> bytes:
    """Payload for flat fp32 `values` (named as in `shapes`); each array becomes its residual."""
    table, _ = encode_tensors(values, shapes, codec, density=density, selection=selection)
    return pack(header, table)


def decode(blob: bytes | memoryview, shapes: Shapes) -> tuple[Header, dict[str, Decoded]]:
    """The header and every decoded tensor of a payload, all checked (`PayloadError` if not)."""
    payload = unpack(blob, shapes, payload_limit(shapes))
    codec = CODEC_IDS.get(payload.header.codec_id)
    if codec is None:
        raise PayloadError(f"unknown codec id {payload.header.codec_id}", "unknown-codec")
    decoded: dict[str, Decoded] = {}
    for entry in payload.tensors:
        try:
            decoded[entry.name] = codec.decode(entry.body, int(np.prod(entry.shape)))
        except PayloadError as exc:
            raise PayloadError(f"tensor {entry.name}: {exc}", exc.reason) from None
    return payload.header, decoded


def check_header(header: Header, *, kind: Kind, round: int | None = None, base: bytes | None = None) -> None:
    """Refuse a payload of the wrong kind, round or base model."""
    if header.kind != kind:
        raise PayloadError(f"payload kind {header.kind.name}, expected {kind.name}", "bad-kind")
    if round is not None and header.round != round:
        raise PayloadError(f"payload is for round {header.round}, this is round {round}", "wrong-round")
    if base is not None and header.base != base:
        raise PayloadError(
            f"payload is built on model {header.base.hex()[:12]}, not on {base.hex()[:12]}", "stale-base"
        )


def apply(state: Mapping[str, torch.Tensor], decoded: Mapping[str, Decoded]) -> None:
    """Add decoded changes to fp32 CPU tensors in place (the same operation on every side)."""
    for name, change in decoded.items():
        change.add_to(state[name].view(-1).numpy())
