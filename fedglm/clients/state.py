"""A site's state between messages, on disk under its `state_dir`.

Flower starts a fresh ClientApp process for every message, so whatever a site must remember
lives in files, each replaced atomically:
- `global-model.pt`: the global model this site holds (weights, hash, run key, and the pruning
  mask it is sliced to). Each message brings only the change since that model, or nothing when
  the site already holds it.
- `residual.pt`: what error feedback has not sent yet. It is built from the update as it
  leaves training (with DP on: the privatised update), so it carries nothing else from the
  site's records. A residual that is not finite is never used.
Both record the run key: state left by another federation run is ignored, never mixed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedglm.atomic import atomic_write

MODEL_FILE = "global-model.pt"
RESIDUAL_FILE = "residual.pt"


@dataclass
class HeldModel:
    run: str
    hash: bytes
    state: dict[str, torch.Tensor]
    mask: str = ""  # the pruning mask's JSON as the coordinator sent it; "" while unpruned


def _load(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None  # a damaged file only costs a full model or a lost residual
    return payload if isinstance(payload, dict) else None


def _save(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda handle: torch.save(payload, handle))


def load_held(state_dir: Path, run: str) -> HeldModel | None:
    payload = _load(state_dir / MODEL_FILE)
    if payload is None or payload.get("run") != run:
        return None
    return HeldModel(run, bytes(payload["hash"]), dict(payload["state"]), str(payload.get("mask", "")))


def save_held(state_dir: Path, held: HeldModel) -> None:
    _save(
        state_dir / MODEL_FILE,
        {"run": held.run, "hash": list(held.hash), "state": held.state, "mask": held.mask},
    )


def load_residual(
    state_dir: Path, run: str, shapes: dict[str, tuple[int, ...]]
) -> dict[str, np.ndarray] | None:
    """The residual of this run, flat fp32 per tensor; None if there is none, or if it does not
    fit `shapes` (after pruning changed the model: the unsent remainder is dropped once)."""
    payload = _load(state_dir / RESIDUAL_FILE)
    if payload is None or payload.get("run") != run:
        return None
    residual: dict[str, torch.Tensor] = payload["residual"]
    if {k: int(np.prod(s)) for k, s in shapes.items()} != {k: v.numel() for k, v in residual.items()}:
        return None
    arrays = {name: residual[name].reshape(-1).numpy() for name in shapes}
    if not all(np.isfinite(array).all() for array in arrays.values()):
        return None  # never carry NaN forward (none is ever saved: the encoder refuses it)
    return arrays


def save_residual(state_dir: Path, run: str, residual: dict[str, np.ndarray]) -> None:
    _save(
        state_dir / RESIDUAL_FILE,
        {"run": run, "residual": {name: torch.from_numpy(values) for name, values in residual.items()}},
    )
