"""How a run's rounds are shown: one live line per round, then a table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedglm.reports import ExportReport, read_report

console = Console(stderr=False, highlight=False)


def _num(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def _mb(value: Any) -> str:
    return "-" if value is None else f"{int(value) / 1e6:.2f} MB"


def _fewer(sent: Any, dense: Any) -> str:
    """'(37x fewer than dense)', or '' when either figure is missing."""
    if not sent or not dense:
        return ""
    return f" ({int(dense) / int(sent):.0f}x fewer than dense)"


def round_line(row: dict[str, Any], total_rounds: int) -> str:
    rejected = f"  rejected {row['rejected_updates']}" if row.get("rejected_updates") else ""
    declined = f"  declined {row['declined']}" if row.get("declined") else ""
    epsilon = f"  epsilon_max {_num(row['epsilon_max'], 3)}" if row.get("epsilon_max") is not None else ""
    public = f"public_val_loss {_num(row['public_val_loss'])}  " if "public_val_loss" in row else ""
    dp = f"dp_val_loss {_dp(row)}  " if "dp_val_loss" in row else ""
    return (
        f"round {row['round']}/{total_rounds}  train_loss {_num(row.get('train_loss'))}  "
        f"val_loss {_num(row.get('val_loss'))}  val_bpb {_num(row.get('val_bpb'), 3)}  {dp}{public}"
        f"up {_mb(row.get('upload_bytes'))}  down {_mb(row.get('download_bytes'))}  "
        f"clients {row.get('clients')}{rejected}{declined}{epsilon}  {_num(row.get('seconds'), 1)} s"
    )


def _dp(row: dict[str, Any]) -> str:
    """The sites' loss released under DP, with its noise: '5.612 +-0.041'."""
    if row.get("dp_val_loss") is None:
        return "-"
    return f"{_num(row['dp_val_loss'])} +-{_num(row.get('dp_val_noise'), 3)}"


def traffic_summary(rows: list[dict[str, Any]]) -> str:
    """Total bytes both ways against what dense fp32 tensors would have weighed."""

    def total(key: str) -> int | None:
        values = [row.get(key) for row in rows]
        if any(v is None for v in values):
            return None  # rows written before the key existed
        return sum(int(v) for v in values if v is not None)

    up, dense_up = total("upload_bytes"), total("dense_upload_bytes")
    down, dense_down = total("download_bytes"), total("dense_download_bytes")
    return (
        f"upload {_mb(up)} against {_mb(dense_up)} dense{_fewer(up, dense_up)}; "
        f"download {_mb(down)} against {_mb(dense_down)} dense{_fewer(down, dense_down)}"
    )


def print_round(row: dict[str, Any], total_rounds: int) -> None:
    console.print(round_line(row, total_rounds))


def table_title(command: str, rows: list[dict[str, Any]], metrics: Path) -> str:
    """'fedglm simulate: 3 rounds after round 0 (the base), metrics in ...'."""
    trained = sum(1 for row in rows if int(row.get("round", 0)) > 0)
    base = " after round 0 (the base)" if any(int(row.get("round", 0)) == 0 for row in rows) else ""
    return f"{command}: {trained} rounds{base}, metrics in {metrics}"


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    public = any("public_val_loss" in row for row in rows)  # the coordinator's own evaluation
    dp = any("dp_val_loss" in row for row in rows)  # the sites' loss released under DP
    table = Table(title=title)
    for column in (
        "round",
        "train loss",
        "val loss",
        "val bpb",
        *(["DP val loss"] if dp else []),
        *(["public val loss"] if public else []),
        "up",
        "down",
        "clients",
        "eps max",
        "s",
    ):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row["round"]),
            _num(row.get("train_loss")),
            _num(row.get("val_loss")),
            _num(row.get("val_bpb"), 3),
            *([_dp(row)] if dp else []),
            *([_num(row.get("public_val_loss"))] if public else []),
            _mb(row.get("upload_bytes")),
            _mb(row.get("download_bytes")),
            str(row.get("clients")),
            _num(row.get("epsilon_max"), 3),
            _num(row.get("seconds"), 1),
        )
    console.print(table)
    console.print(traffic_summary(rows))


def print_privacy(rows: list[dict[str, Any]]) -> None:
    """Each DP site's ledger: rounds it released, epsilon spent against its budget."""
    table = Table(title="privacy (unit: one record; accountant as configured; see `fedglm audit`)")
    columns = ("site", "rounds", "metric releases", "epsilon", "budget", "delta", "sigma", "q", "receipts")
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["site"],
            str(row["rounds"]),
            str(row["metric_releases"]),
            _num(row["epsilon"], 3),
            f"{row['budget']:g}",
            f"{row['delta']:g}",
            _num(row["sigma"], 3),
            _num(row["q"], 4),
            str(row["receipts"]),
        )
    console.print(table)
    for row in rows:
        console.print(f"[dim]{row['site']}: ledger {row['ledger']}[/dim]")


def print_release(folder: Path) -> None:
    """The files of a release folder, with the exported files' parity and bits per byte."""
    report = read_report(folder, ExportReport)
    by_file = {info.file: info for info in report.files.values()} if report else {}
    table = Table(title=f"release: {folder}")
    table.add_column("file", no_wrap=True, min_width=20)
    for column in ("bytes", "max |logit diff|", "next-token agreement", "held-out bits/byte"):
        table.add_column(column, justify="right")
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        info = by_file.get(path.name)
        diff = info.max_abs_logit_diff if info else None
        table.add_row(
            path.name,
            f"{path.stat().st_size:,}",
            "" if diff is None else f"{diff:.2e}",
            _num(info.next_token_agreement) if info else "",
            _num(info.held_out_bits_per_byte) if info else "",
        )
    console.print(table)


def status(message: str) -> None:
    console.print(f"[dim]{message}[/dim]")
