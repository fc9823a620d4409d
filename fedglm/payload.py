"""What travels in a Flower message, and the checks applied to what arrives.

Content keys (both directions): `arrays` (an ArrayRecord), `config` (a ConfigRecord, server to
client), `metrics` (a MetricRecord, client to server), `ledger` (a ConfigRecord, client to
server: the signed ledger line of the update, or why the site declined the round), `receipt` (a
ConfigRecord, server to client: the countersignature of the site's last entry). What `config`
and `receipt` hold is the round protocol (`protocol.py`). fedglm's own messages carry one bytes
Array named `payload` (stype `fedglm/1`) in `arrays`: a compressed payload in the format of
`compression/FORMAT.md`. Plain FedAvg messages (Flower's stock
strategies) carry fp32 tensors named as in the model's state dict instead; the ClientApp
answers those in kind (sites without DP only). Anything from the network is checked before
use; a failure is a `PayloadError` naming the problem.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from torch import nn

from fedglm.compression.wire import PayloadError
from fedglm.models.lora import wire_state

__all__ = ["PayloadError"]

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
PAYLOAD_NAME = "payload"
PAYLOAD_STYPE = "fedglm/1"
STALE_MODEL = "stale-model"  # a client's error reason: it needs the full model
LEDGER_KEY = "ledger"  # client to server: the round's signed ledger line(s) and the site's public key
RECEIPT_KEY = "receipt"  # server to client: the coordinator's receipts ("lines") for the site's new entries


def payload_record(blob: bytes) -> ArrayRecord:
    """A compressed payload as the one bytes Array of an ArrayRecord."""
    return ArrayRecord(
        {PAYLOAD_NAME: Array(dtype="bytes", shape=(len(blob),), stype=PAYLOAD_STYPE, data=blob)}
    )


def read_payload(content: RecordDict) -> bytes | None:
    """The compressed payload of a message; None when it carries plain fp32 tensors instead."""
    record = content.array_records.get(ARRAYS_KEY)
    if record is None:
        raise PayloadError(f"no '{ARRAYS_KEY}' ArrayRecord in the message", "no-payload")
    if PAYLOAD_NAME not in record:
        return None
    if len(record) != 1:
        raise PayloadError(f"'{PAYLOAD_NAME}' must be the only array of the message", "bad-record")
    array = record[PAYLOAD_NAME]
    if array.dtype != "bytes" or array.stype != PAYLOAD_STYPE:
        raise PayloadError(
            f"'{PAYLOAD_NAME}' is {array.dtype}/{array.stype}, expected bytes/{PAYLOAD_STYPE}", "bad-record"
        )
    return bytes(array.data)


MAX_SITE_TEXT = 200  # characters of a site's text (error reason, decline reason) the coordinator logs


def site_number(record: Mapping[str, Any], key: str) -> float | None:
    """The finite number a site sent under `key`; anything else (a list, NaN, a bool) counts as absent."""
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def site_text(value: object) -> str:
    """A site's text for the coordinator's log: printable, one line, at most `MAX_SITE_TEXT` characters."""
    text = value if isinstance(value, str) else type(value).__name__
    clipped = text[: MAX_SITE_TEXT + 1]
    line = "".join(c if c.isprintable() else " " for c in clipped)
    return line if len(text) <= MAX_SITE_TEXT else line[:MAX_SITE_TEXT] + "..."


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Names (as on the wire, `models/lora.wire_state`) and shapes of the model's tensors."""
    return {name: tuple(t.shape) for name, t in wire_state(model).items()}


def state_record(model: nn.Module) -> ArrayRecord:
    """The model's weights as an ArrayRecord of fp32 tensors (on the CPU), under wire names."""
    return ArrayRecord({k: v.float().cpu() for k, v in wire_state(model).items()})


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
