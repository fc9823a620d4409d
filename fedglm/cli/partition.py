"""`fedglm partition`: split one labelled CSV corpus into K non-IID hospital data sets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedglm.cli.common import reports_errors
from fedglm.errors import InputError, check_out_folder
from fedglm.partition import partition_csv


@reports_errors
def partition(
    source: Annotated[Path, typer.Argument(help="CSV corpus, e.g. ../shared/data/mtsamples.csv.")],
    by: Annotated[str, typer.Option(help="Label column that defines the sites' specialties.")],
    sites: Annotated[int, typer.Option(help="Number of hospital data sets to make.")],
    out: Annotated[Path, typer.Option(help="Folder for site-N.jsonl and partition.json.")],
    text_column: Annotated[str, typer.Option(help="Column holding the record text.")] = "transcription",
) -> None:
    """Deduplicate texts, then deal whole labels to sites (non-IID, balanced in size)."""
    if not source.is_file():
        raise InputError(f"{source} does not exist (or is not a file)")
    check_out_folder(out)
    parts = partition_csv(source, text_column=text_column, label_column=by, sites=sites, out_dir=out)
    for part in parts:
        labels = ", ".join(part.labels[:4]) + (" ..." if len(part.labels) > 4 else "")
        typer.echo(f"{part.path}: {part.records} records ({labels})")
