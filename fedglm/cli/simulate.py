"""`fedglm simulate`: the built-in default job (a whole federation on 127.0.0.1, with TLS)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedglm.cli.common import reports_errors
from fedglm.cli.progress import print_privacy, print_release, print_round, print_table, status, table_title
from fedglm.config import SimulateConfig, load_config
from fedglm.layout import METRICS_NAME, RELEASE_DIR
from fedglm.release import release
from fedglm.simulate import run_simulation


@reports_errors
def simulate(
    config: Annotated[
        Path | None, typer.Option(help="Simulation YAML (default: the built-in generated corpus).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Run folder (metrics.jsonl, checkpoint, logs).")] = Path(
        "runs/simulate"
    ),
) -> None:
    """Run a SuperLink and one SuperNode per site on 127.0.0.1 with TLS, and train together."""
    cfg = load_config(config, SimulateConfig) if config else SimulateConfig()
    rounds = cfg.federation.rounds
    rows, privacy = run_simulation(cfg, out, on_row=lambda row: print_round(row, rounds), on_status=status)
    print_table(rows, title=table_title("fedglm simulate", rows, out / METRICS_NAME))
    if privacy:
        print_privacy(privacy)
    if cfg.release is not None:
        status("distilling the final model into a student and exporting it (release section)")
        release(out, cfg.release)
        print_release(out / RELEASE_DIR)
