"""`fedglm pretrain`: train the federation's base model on public text (coordinator side)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fedglm.cli.common import reports_errors
from fedglm.cli.progress import console, status
from fedglm.config import PretrainConfig, load_config
from fedglm.errors import check_out_folder
from fedglm.layout import BASE_MODEL_DIR
from fedglm.pretrain import pretrain


@reports_errors
def pretrain_command(
    config: Annotated[Path, typer.Option(help="Pretraining YAML (see server/pretrain.yaml).")],
) -> None:
    """Train a tokenizer and a GLM-4 base model on public text only; resumable; writes a model folder."""
    cfg = load_config(config, PretrainConfig)
    check_out_folder(cfg.out_dir, f"{config}: out_dir")
    status(f"pretraining a {cfg.model.preset} model on public text for {cfg.steps} steps into {cfg.out_dir}")
    with Progress(
        TextColumn("pretrain"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("held-out {task.fields[val]}"),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("pretrain", total=cfg.steps, loss="-", val="-")
        manifest = pretrain(
            cfg,
            on_step=lambda step, loss: bar.update(task, completed=step, loss=f"{loss:.3f}"),
            on_checkpoint=lambda step, val: bar.update(task, completed=step, val=f"{val.loss:.3f}"),
        )
    final = manifest["final"]
    status(
        f"base model: {manifest['parameters']:,} parameters, {manifest['steps']} steps, held-out loss "
        f"{final['val_loss']:.4f} ({final['val_bits_per_byte']:.4f} bits/byte); "
        f"folder hash {manifest['folder_hash']}"
    )
    status(f"wrote {cfg.out_dir / BASE_MODEL_DIR}: name it as federation.base and as each hospital's base")
