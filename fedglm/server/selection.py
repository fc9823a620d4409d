"""Which round's model a run releases, and when it stops helping (`federation.selection`).

After each round's row is written (its checkpoint first), `select` looks at every row of the
run: the best round is the one with the lowest `metric`, each later round having to beat the
best so far by more than `min_delta`. When the new round is the best, its checkpoint is copied
to `best.pt` (atomically), which the release then takes instead of the last round's model;
round 0, the base, counts too. With `patience`, the run stops once that many rounds have
passed without a better one. A row without the metric (the sites keep their losses) is never
the best. Everything is recomputed from `metrics.jsonl`, so a resumed run decides as an
uninterrupted one would.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedglm import metrics
from fedglm.atomic import atomic_write
from fedglm.config import SelectionConfig
from fedglm.layout import BEST_CHECKPOINT, CHECKPOINT_NAME
from fedglm.server.checkpoint import Checkpoint, load_checkpoint


@dataclass(frozen=True)
class Best:
    round: int
    value: float


def best_round(rows: list[dict[str, Any]], cfg: SelectionConfig) -> Best | None:
    """The selected round among `rows` (None: no row has the metric)."""
    best: Best | None = None
    for row in rows:
        value = row.get(cfg.metric)
        if value is None or value != value:  # missing or NaN
            continue
        if best is None or float(value) < best.value - cfg.min_delta:
            best = Best(int(row["round"]), float(value))
    return best


def select(out_dir: Path, cfg: SelectionConfig, server_round: int) -> bool:
    """Keep the round's checkpoint if it is the best so far; whether the run should stop."""
    best = best_round(metrics.read_rows(out_dir), cfg)
    if best is None:
        return False
    if best.round == server_round:
        source = out_dir / CHECKPOINT_NAME
        with source.open("rb") as handle:
            atomic_write(out_dir / BEST_CHECKPOINT, lambda target: shutil.copyfileobj(handle, target))
    return cfg.patience is not None and server_round - best.round >= cfg.patience


def released_checkpoint(run_dir: Path) -> Checkpoint | None:
    """What the release takes: the best round's checkpoint where selection kept one, else the
    last round's."""
    best = load_checkpoint(run_dir, BEST_CHECKPOINT)
    return best if best is not None else load_checkpoint(run_dir)


def clear(out_dir: Path) -> None:
    """A fresh run drops an earlier run's best checkpoint."""
    (out_dir / BEST_CHECKPOINT).unlink(missing_ok=True)
