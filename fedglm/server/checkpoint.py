"""The coordinator's checkpoint: the global model after the last finished round.

`checkpoint.pt` in the run folder is replaced atomically after every round, so a killed server
always finds either the previous or the new checkpoint, never a torn one. It records the round,
the global model's weights (as the clients hold them), the downlink residual (what the server
has not sent yet), the run key (clients keep their own state for this key only), and a
fingerprint of the model's shape: resuming with a different model is refused rather than
silently mixed. It also records the pruning mask the model is sliced to (`fedglm/pruning.py`),
as JSON ("" while unpruned).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedglm.atomic import atomic_write
from fedglm.errors import InputError
from fedglm.layout import CHECKPOINT_NAME

FORMAT_VERSION = 3
READABLE_FORMATS = (2, 3)  # format 2: before pruning, always unpruned


def model_fingerprint(model_config: dict[str, Any], *, base: str | None = None, lora: Any = None) -> str:
    """What a resumed run must share with the checkpoint: the model's shape, and (when set) the
    base model's hash and the LoRA adapters' settings."""
    described = dict(model_config)
    if base is not None:
        described["base"] = base
    if lora is not None:
        described["lora"] = repr(lora)
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Checkpoint:
    round: int
    state: dict[str, torch.Tensor]
    residual: dict[str, torch.Tensor]
    run_key: str
    fingerprint: str
    mask: str = ""


def save_checkpoint(out_dir: Path, checkpoint: Checkpoint) -> Path:
    path = out_dir / CHECKPOINT_NAME
    payload = {
        "format": FORMAT_VERSION,
        "round": checkpoint.round,
        "fingerprint": checkpoint.fingerprint,
        "state": checkpoint.state,
        "residual": checkpoint.residual,
        "run_key": checkpoint.run_key,
        "mask": checkpoint.mask,
    }
    atomic_write(path, lambda handle: torch.save(payload, handle))
    return path


def load_checkpoint(out_dir: Path, name: str = CHECKPOINT_NAME) -> Checkpoint | None:
    """The run folder's checkpoint (or its copy `name`), or None if there is none yet."""
    path = out_dir / name
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload["format"] not in READABLE_FORMATS:
            raise InputError(f"{path}: checkpoint format {payload['format']} is not supported")
        return Checkpoint(
            round=int(payload["round"]),
            state=payload["state"],
            residual=payload["residual"],
            run_key=str(payload["run_key"]),
            fingerprint=payload["fingerprint"],
            mask=str(payload.get("mask", "")),
        )
    except InputError:
        raise
    except Exception as exc:
        raise InputError(
            f"{path}: unreadable checkpoint ({type(exc).__name__}); move it away to start afresh"
        ) from None
