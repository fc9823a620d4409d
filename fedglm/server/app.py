"""The fedglm ServerApp: runs inside Flower's `flwr-serverapp` process on the coordinator.

`fedglm server` writes the run's spec (`run-spec.json`) into the run folder and passes its path
as the run config value `fedglm-spec`. The app reads as three steps: `start_or_resume` (the
base model folder, with LoRA adapters when sites train only those; or the folder's checkpoint),
`make_strategy` (`FedglmAvg` with the round settings and the ledger check), and `run_rounds`,
after each of which the checkpoint is written (atomically) and then the round's metrics line. A
fresh run draws a random run key and checkpoints round 0; clients keep their state (model copy,
residual) under that key only.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedglm import metrics
from fedglm.atomic import atomic_write_text
from fedglm.config import RunSpec
from fedglm.errors import InputError
from fedglm.layout import DONE_NAME, MANIFEST_FILE, METRICS_NAME, RECEIPTS_DIR, SPEC_KEY
from fedglm.models.base import BaseModel, open_federation_base
from fedglm.models.lora import is_trained_adapter, wire_state
from fedglm.models.pruning import Mask
from fedglm.pretrain import read_base_manifest
from fedglm.privacy.keys import load_private_key
from fedglm.protocol import RoundConfig
from fedglm.server.broadcast import Broadcast
from fedglm.server.checkpoint import load_checkpoint, model_fingerprint, save_checkpoint
from fedglm.server.countersign import Countersigner
from fedglm.server.global_model import GlobalModel
from fedglm.server.ledger_check import LedgerCheck
from fedglm.server.public_eval import PublicEval
from fedglm.server.rounds import run_rounds
from fedglm.server.selection import clear as clear_best
from fedglm.server.selection import select
from fedglm.server.site_metrics import SiteMetrics, SiteMetricsPool
from fedglm.server.strategy import FedglmAvg

app = ServerApp()


def read_spec(context: Context) -> RunSpec:
    path = context.run_config.get(SPEC_KEY)
    if not isinstance(path, str):
        raise InputError(f"run config has no '{SPEC_KEY}': start runs with `fedglm server`")
    return RunSpec.model_validate_json(Path(path).read_text(encoding="utf-8"))


@app.main()
def main(grid: Grid, context: Context) -> None:
    spec = read_spec(context)
    run_federation(grid, spec)


def run_federation(grid: Grid, spec: RunSpec) -> None:
    """Start (or resume) the run, then its rounds; each finished round is persisted."""
    fed, out_dir = spec.federation, spec.out_dir
    start = start_or_resume(spec)
    if start.first_round > fed.rounds:
        log(INFO, "All %d rounds are already done in %s", fed.rounds, out_dir)
        return
    strategy = make_strategy(spec, start)
    strategy.summary()
    public = PublicEval.open(fed.public_eval, start.base, fed.train.seq_len) if fed.public_eval else None

    selection = fed.selection
    if selection is not None and start.first_round > 1 and select(out_dir, selection, start.first_round - 1):
        log(INFO, "No better round for `selection.patience` rounds before the restart: the run is over")
        atomic_write_text(out_dir / DONE_NAME, f"{start.first_round - 1}\n")
        return

    def persist(server_round: int, row: dict[str, Any]) -> bool:
        """The checkpoint first, then the metrics line (a line always has its checkpoint), then
        the best round's copy; whether the run stops here (`selection.patience`)."""
        if public is not None:  # the coordinator's own score on public text: no privacy spent
            stats = public.score(start.model.current())
            row |= {"public_val_loss": stats.loss, "public_val_bpb": stats.bits_per_byte}
        checkpoint = start.model.checkpoint(
            server_round, run_key=start.run_key, fingerprint=start.fingerprint
        )
        save_checkpoint(out_dir, checkpoint)
        metrics.append_round(out_dir, row)
        log(INFO, "round %d: %s", server_round, row)
        return selection is not None and select(out_dir, selection, server_round)

    last = run_rounds(
        grid,
        strategy,
        first_round=start.first_round,
        last_round=fed.rounds,
        dense_model_bytes=start.dense_bytes,
        timeout=fed.round_timeout_s,
        on_round=persist,
    )
    atomic_write_text(out_dir / DONE_NAME, f"{last}\n")


@dataclass(frozen=True)
class Start:
    """Where a run starts: the global model, the run key, the first round to run, the model's
    identity (`fingerprint`), its base folder and its dense size (for the traffic figures)."""

    model: GlobalModel
    run_key: str
    first_round: int
    fingerprint: str
    base: BaseModel
    dense_bytes: int


def start_or_resume(spec: RunSpec) -> Start:
    """The base model, with LoRA adapters when sites train only those; or, with `resume`, the
    folder's checkpoint (of the same base and adapters only)."""
    fed, out_dir = spec.federation, spec.out_dir
    base, lora = open_federation_base(fed)
    manifest = read_base_manifest(base.folder)
    if manifest is not None:  # the run folder keeps the base's provenance for the model card
        atomic_write_text(out_dir / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    model = base.build(lora=lora)
    dense_bytes = 4 * base.parameters  # the unpruned model, dense, without adapters
    state = dict(wire_state(model))
    trainable = [name for name in state if is_trained_adapter(name)] if lora else None
    fingerprint = model_fingerprint(fed.model.model_dump(), base=base.hash, lora=lora)
    first_round, mask = 1, Mask.full(base.shape)
    checkpoint = load_checkpoint(out_dir) if spec.resume else None
    if checkpoint is not None:
        if checkpoint.fingerprint != fingerprint:
            raise InputError(
                f"{out_dir}: its checkpoint is of another base model or adapter setting; use a new out_dir"
            )
        # (a round-0 checkpoint is the model every site builds from its base folder: INIT, as before)
        broadcast = Broadcast(
            checkpoint.state, residual=checkpoint.residual, trainable=trainable, initial=checkpoint.round == 0
        )
        run_key = checkpoint.run_key
        first_round = checkpoint.round + 1
        if checkpoint.mask:
            mask = Mask.from_json(checkpoint.mask, base.shape)
        # (from round 0, the base's evaluation is run again: its row goes)
        metrics.truncate_after(out_dir, checkpoint.round if checkpoint.round > 0 else -1)
        log(INFO, "Resuming from the checkpoint of round %d", checkpoint.round)
    else:
        # Every site builds the first model from its own copy of the base: round 1 sends INIT.
        broadcast = Broadcast(state, initial=True, trainable=trainable)
        run_key = secrets.token_hex(8)
        if (out_dir / METRICS_NAME).exists():
            metrics.truncate_after(out_dir, -1)  # an earlier run's rows, round 0 included, go
        clear_best(out_dir)  # and its best round's model
    global_model = GlobalModel(
        broadcast, base=base, pruning=fed.pruning, mask=mask, lora_scale=lora.scale if lora else None
    )
    if checkpoint is None:
        # Round 0 is persisted too: a restart during round 1 resumes this run (same run key),
        # so a site that spent its budget on round 1 is not asked to spend it again.
        save_checkpoint(out_dir, global_model.checkpoint(0, run_key=run_key, fingerprint=fingerprint))
    return Start(global_model, run_key, first_round, fingerprint, base, dense_bytes)


def make_strategy(spec: RunSpec, start: Start) -> FedglmAvg:
    """The run's strategy: the round settings every site gets, the ledger check, the rules."""
    fed = spec.federation
    countersigner = Countersigner(
        load_private_key(spec.receipt_key), spec.out_dir / RECEIPTS_DIR, start.run_key, nodes=spec.nodes
    )
    settings = RoundConfig(
        model=fed.model,
        train=fed.train,
        seed=fed.seed,
        rounds=fed.rounds,
        run_key=start.run_key,
        base_hash=start.base.hash,  # sites check what they receive against it
    )
    return FedglmAvg(
        model=start.model,
        ledgers=LedgerCheck(countersigner, required=fed.require_dp),
        settings=settings,
        compression=fed.compression,
        min_clients=fed.min_clients,
        fraction_train=fed.fraction_train,
        weighting=fed.weighting,
        max_update_norm=fed.max_update_norm,
        aggregation=fed.aggregation,
        trim_fraction=fed.trim_fraction,
        site_metrics=SiteMetricsPool(fed.site_metrics, previous=_last_estimate(spec.out_dir, start)),
    )


def _last_estimate(out_dir: Path, start: Start) -> SiteMetrics | None:
    """The last finished round's pooled DP metrics (the next window's centre), on a resume."""
    rows = metrics.read_rows(out_dir) if start.first_round > 1 else []
    found = [estimate for estimate in map(SiteMetrics.from_row, rows) if estimate is not None]
    return found[-1] if found else None
