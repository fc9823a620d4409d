"""`fedglm distill` and `fedglm export`: turn a finished run folder into a served model.

Both read `<run>/run-spec.json` and `<run>/checkpoint.pt` (the final, pruned global model) and
a release YAML with the keys of a coordinator config's `release:` section (`public_text`,
`distill`, `export`; default: generated public text and the defaults of each). Output goes to
`<run>/release/`, with the model card rewritten after each command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedglm.cli.common import reports_errors
from fedglm.cli.progress import print_release, status
from fedglm.config import ReleaseConfig, load_config
from fedglm.errors import InputError
from fedglm.layout import RELEASE_DIR
from fedglm.release import run_distill, run_export

RunDir = Annotated[
    Path, typer.Argument(help="Run folder of fedglm server or simulate (holds run-spec.json).")
]
ReleaseFile = Annotated[
    Path | None, typer.Option("--config", help="Release YAML: public_text, distill, export sections.")
]


def _config(path: Path | None) -> ReleaseConfig:
    return load_config(path, ReleaseConfig) if path else ReleaseConfig()


@reports_errors
def distill(run: RunDir, config: ReleaseFile = None) -> None:
    """Distill the run's final model into a smaller student on public text."""
    cfg = _config(config)
    status(f"distilling {run} on public text")
    report = run_distill(run, cfg)
    teacher, student = report.teacher, report.student
    status(
        f"teacher {teacher.parameters:,} parameters, {teacher.bits_per_byte:.4f} bits/byte; "
        f"student {student.parameters:,} parameters, {student.bits_per_byte:.4f} bits/byte "
        f"(held-out public text)"
    )
    print_release(run / RELEASE_DIR)


@reports_errors
def export(
    run: RunDir,
    format: Annotated[
        list[str] | None, typer.Option("--format", help="onnx (default) or tensorrt; repeat for both.")
    ] = None,
    config: ReleaseFile = None,
) -> None:
    """Export the student (or the pruned model) to ONNX or TensorRT; exit 1 if parity fails."""
    cfg = _config(config)
    format = format or ["onnx"]
    for name in format:
        if name not in ("onnx", "tensorrt"):
            raise InputError(f"--format {name!r}: choose onnx or tensorrt")
    status(f"exporting {run} ({', '.join(format)})")
    run_export(run, cfg, format)
    print_release(run / RELEASE_DIR)
