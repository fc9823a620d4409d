"""How a run's rounds are shown: one live line per round, then a table."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(stderr=False, highlight=False)


def _num(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def _mb(value: Any) -> str:
    return "-" if value is None else f"{int(value) / 1e6:.2f} MB"


def round_line(row: dict[str, Any], total_rounds: int) -> str:
    return (
        f"round {row['round']}/{total_rounds}  train_loss {_num(row.get('train_loss'))}  "
        f"val_loss {_num(row.get('val_loss'))}  val_bpb {_num(row.get('val_bpb'), 3)}  "
        f"up {_mb(row.get('upload_bytes'))}  down {_mb(row.get('download_bytes'))}  "
        f"clients {row.get('clients')}  {_num(row.get('seconds'), 1)} s"
    )


def print_round(row: dict[str, Any], total_rounds: int) -> None:
    console.print(round_line(row, total_rounds))


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    table = Table(title=title)
    for column in (
        "round",
        "train loss",
        "val loss",
        "val bpb",
        "up",
        "down",
        "clients",
        "s",
    ):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row["round"]),
            _num(row.get("train_loss")),
            _num(row.get("val_loss")),
            _num(row.get("val_bpb"), 3),
            _mb(row.get("upload_bytes")),
            _mb(row.get("download_bytes")),
            str(row.get("clients")),
            _num(row.get("seconds"), 1),
        )
    console.print(table)


def status(message: str) -> None:
    console.print(f"[dim]{message}[/dim]")
