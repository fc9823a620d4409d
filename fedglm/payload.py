"""What travels in a Flower message, and the checks applied to what arrives.

Content keys (both directions): `arrays` (an ArrayRecord of fp32 tensors named as in the
model's state dict), `config` (a ConfigRecord, server to client), `metrics` (a MetricRecord,
client to server). Anything from the network is checked before use: names, shapes, dtype and
finiteness; a failure is a `PayloadError` naming the problem.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from torch import nn

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"


class PayloadError(ValueError):
    """A message's content does not match what the receiver expects."""


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def state_record(model: nn.Module) -> ArrayRecord:
    """The model's weights as an ArrayRecord of fp32 tensors (on the CPU)."""
    return ArrayRecord({k: v.detach().float().cpu() for k, v in model.state_dict().items()})


def read_state(content: RecordDict, expected: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The `arrays` record of `content` as tensors, checked against `expected` names/shapes."""
    record = content.array_records.get(ARRAYS_KEY)
    if record is None:
        raise PayloadError(f"no '{ARRAYS_KEY}' ArrayRecord in the message")
    names = set(record.keys())
    if names != set(expected):
        missing = sorted(set(expected) - names)[:3]
        extra = sorted(names - set(expected))[:3]
        raise PayloadError(f"tensor names differ from the model (missing {missing}, unexpected {extra})")
    state: dict[str, torch.Tensor] = {}
    for name, shape in expected.items():
        array = record[name]
        if array.dtype != "float32" or tuple(array.shape) != shape:
            raise PayloadError(
                f"tensor {name}: got {array.dtype}{list(array.shape)}, expected float32{list(shape)}"
            )
        try:
            values = array.numpy()
        except Exception as exc:  # corrupt bytes from the network
            raise PayloadError(f"tensor {name}: cannot be decoded ({exc})") from None
        if not np.isfinite(values).all():
            raise PayloadError(f"tensor {name}: holds NaN or infinite values")
        state[name] = torch.from_numpy(np.array(values, copy=True))
    return state


def wire_bytes(obj: Any) -> int:
    """Bytes of a record (or RecordDict) as Flower serializes it: every object in its tree."""
    total = len(obj.deflate())
    for child in (obj.children or {}).values():
        total += wire_bytes(child)
    return total


def dense_array_bytes(record: ArrayRecord) -> int:
    """What `record`'s tensors weigh as dense fp32."""
    return sum(int(np.prod(a.shape)) * 4 for a in record.values())


NULLABLE_TRAIN_KEYS = ("local_steps", "local_epochs", "grad_clip")


def round_config(model: Mapping[str, Any], train: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """The flat `config` sent with each round: `model.*`, `train.*` and the federation seed.

    Null values are left out (a ConfigRecord cannot hold None); the client restores them from
    the config defaults, which are validated again on its side.
    """
    flat: dict[str, Any] = {"seed": seed}
    for prefix, section in (("model", model), ("train", train)):
        for key, value in section.items():
            flat[f"{prefix}.{key}"] = value
    return {k: v for k, v in flat.items() if v is not None}


def split_round_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], int]:
    """Inverse of `round_config`: (model section, train section, seed)."""
    sections: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for key, value in config.items():
        prefix, _, name = key.partition(".")
        if prefix in sections and name:
            sections[prefix][name] = value
    for name in NULLABLE_TRAIN_KEYS:
        sections["train"].setdefault(name, None)
    seed = config.get("seed", 0)
    if not isinstance(seed, int):
        raise PayloadError(f"config 'seed' is {seed!r}, expected an integer")
    return sections["model"], sections["train"], seed
