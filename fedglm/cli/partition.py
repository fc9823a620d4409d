"""`fedglm partition`: split one labelled corpus (CSV, JSONL, label folders of .txt) into K non-IID sites."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, cast

import typer

from fedglm.cli.common import reports_errors
from fedglm.data import DataFormat
from fedglm.errors import InputError, check_out_folder
from fedglm.partition import partition_corpus


@reports_errors
def partition(
    source: Annotated[
        Path,
        typer.Argument(help="CSV or JSONL corpus, or a folder of label folders of .txt files."),
    ],
    sites: Annotated[int, typer.Option(help="Number of hospital data sets to make.")],
    out: Annotated[Path, typer.Option(help="Folder for site-N.jsonl and partition.json.")],
    by: Annotated[
        str, typer.Option(help="Label column or JSONL field that defines the sites' specialties.")
    ] = "",
    text_field: Annotated[
        str, typer.Option("--text-field", "--text-column", help="Column or JSONL field holding the text.")
    ] = "transcription",
    data_format: Annotated[
        str | None, typer.Option("--format", help="csv, jsonl or txt (default: from the name).")
    ] = None,
) -> None:
    """Deduplicate texts, then deal whole labels to sites (non-IID, balanced in size)."""
    if data_format not in (None, "csv", "jsonl", "txt"):
        raise InputError(f"--format {data_format}: choose csv, jsonl or txt")
    fmt = cast("DataFormat | None", data_format)
    if not by and not source.is_dir():  # a folder's label folders name the labels
        raise InputError("--by is required for a CSV or JSONL corpus: name its label column or field")
    check_out_folder(out)
    parts = partition_corpus(source, text_field=text_field, label_field=by, fmt=fmt, sites=sites, out_dir=out)
    for part in parts:
        labels = ", ".join(part.labels[:4]) + (" ..." if len(part.labels) > 4 else "")
        typer.echo(f"{part.path}: {part.records} records ({labels})")
