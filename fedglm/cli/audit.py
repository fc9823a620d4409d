"""`fedglm audit`: verify a site's privacy ledger and recompute its epsilon independently.

Exit codes: 0 everything holds and every entry is countersigned in the coordinator's receipts
(verified); 3 everything the ledger alone can show holds, but no receipts were checked, so a
site that re-signed its own ledger would pass too (not verified against the coordinator);
1 a budget was exceeded, a claim is below its recomputation, the budget or delta changed, an
entry lacks its receipt, or the ledger or a receipt was tampered with; 2 unreadable input.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedglm.cli.common import reports_errors
from fedglm.errors import CheckFailed, InputError, Unverified
from fedglm.privacy.audit import AuditReport, audit_ledger, default_receipts
from fedglm.privacy.keys import load_public_key
from fedglm.privacy.ledger import read_text_file
from fedglm.privacy.receipts import read_receipts

console = Console(highlight=False, width=shutil.get_terminal_size((150, 24)).columns)
SHOWN_PROBLEMS = 10


@reports_errors
def audit(
    ledger: Annotated[Path, typer.Argument(help="The site's ledger.jsonl.")],
    public_key: Annotated[Path, typer.Option(help="The site's public key (ledger.pub).")],
    server_key: Annotated[
        Path | None, typer.Option(help="The coordinator's public key (receipt.pub): check the receipts.")
    ] = None,
    receipts: Annotated[
        Path | None,
        typer.Option(
            help="Receipts file (default: receipts.jsonl beside the ledger; or the coordinator's copy)."
        ),
    ] = None,
    budget: Annotated[
        float | None, typer.Option(help="Check epsilon against this budget instead of each entry's own.")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of epsilon against rounds.")] = None,
) -> None:
    """Verify the chain, signatures and receipts; recompute epsilon with dp-accounting."""
    if budget is not None and not budget > 0:
        raise InputError(f"--budget {budget:g}: must be a positive epsilon")
    site_key = load_public_key(public_key)
    text = read_text_file(ledger)
    coordinator_key = load_public_key(server_key) if server_key is not None else None
    found = None
    if coordinator_key is not None:
        path = receipts or default_receipts(ledger)
        if receipts is None and not path.exists():
            raise InputError(
                f"--server-key given but no receipts file {path}: pass --receipts with the coordinator's "
                "copy (<run folder>/receipts/<site>.jsonl)"
            )
        found = read_receipts(path)
    elif receipts is not None:
        raise InputError("--receipts needs --server-key (the coordinator's receipt.pub) to check them")
    report = audit_ledger(text, site_key, budget=budget, server_key=coordinator_key, receipts=found)
    if plot is not None:
        write_plot(report, plot)
    if json_output:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print_report(report, ledger)
    if not report.ok:
        raise CheckFailed(f"{ledger}: {report.problems[0]} ({len(report.problems)} problem(s) in all)")
    if not report.verified:
        raise Unverified(
            f"{ledger}: NOT verified against the coordinator: the chain and claims hold under the site's "
            "own key, which could have re-signed them; give --server-key and the coordinator's receipts"
        )


def print_report(report: AuditReport, ledger: Path) -> None:
    table = Table(title=f"ledger of {report.client} ({ledger}), key {report.key[:16]}...")
    columns = (
        "line",
        "round",
        "q",
        "sigma",
        "steps",
        "delta",
        "release",
        "claimed eps",
        "PLD eps",
        "RDP eps",
        "above",
        "receipt",
    )
    replace_one = any(row.replace_one is not None for row in report.rows)
    for column in columns:
        table.add_column(column, justify="right")
    if replace_one:
        table.add_column("replace-one eps", justify="right")
    for row in report.rows:
        extra = [f"{row.replace_one:.4f}" if row.replace_one is not None else "-"] if replace_one else []
        table.add_row(
            str(row.line),
            str(row.round),
            f"{row.q:.4g}",
            f"{row.sigma:.4g}",
            str(row.steps),
            f"{row.delta:g}",
            row.release,
            f"{row.claimed:.4f}",
            f"{row.pld:.4f}",
            f"{row.rdp:.4f}",
            f"{100 * row.difference:+.2f}%",
            row.receipt if report.receipts_checked else "-",
            *extra,
        )
    console.print(table)
    for problem in report.problems[:SHOWN_PROBLEMS]:
        console.print(f"[red]FAIL[/red] {problem}")
    if len(report.problems) > SHOWN_PROBLEMS:
        console.print(f"... and {len(report.problems) - SHOWN_PROBLEMS} more")
    if not report.ok:
        return
    last = report.rows[-1]
    spent = f"epsilon {last.claimed:.4f} at delta {last.delta:g} within the budget {last.budget:g}"
    above = max(row.difference for row in report.rows)
    claims = f"claims at most {100 * above:.2f}% above dp-accounting"
    if report.verified:
        console.print(
            f"OK, verified against the coordinator: {len(report.rows)} entries, chain and signatures "
            f"hold, every entry countersigned; {spent}; {claims}"
        )
    else:
        console.print(
            f"NOT VERIFIED against the coordinator: {len(report.rows)} entries, chain and signatures hold "
            f"under the site's own key (which could re-sign a rewritten ledger); {spent}; {claims}. "
            "Give --server-key and the coordinator's receipts to verify."
        )
    if report.without_metrics is not None:
        releases = sum(1 for row in report.rows if row.release == "metrics")
        console.print(
            f"{releases} release(s) of validation metrics under DP: the updates alone give epsilon "
            f"{report.without_metrics:.4f} (dp-accounting PLD); the metrics cost "
            f"{last.pld - report.without_metrics:.4f}."
        )
    if replace_one and last.replace_one is not None:
        console.print(
            f"The record count is public here (q reveals it): against replacing one record, the same "
            f"history gives epsilon {last.replace_one:.4f}."
        )


def write_plot(report: AuditReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedglm.atomic import atomic_write

    x = list(range(1, len(report.rows) + 1))
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(x, [r.claimed for r in report.rows], "o-", label="claimed (ledger)")
    axes.plot(x, [r.pld for r in report.rows], "s--", label="dp-accounting PLD")
    axes.plot(x, [r.rdp for r in report.rows], "^:", label="dp-accounting RDP")
    if report.rows:
        axes.axhline(report.rows[-1].budget, color="red", linewidth=1, label="budget")
    axes.set_xlabel("rounds released (ledger entries)")
    axes.set_ylabel(f"cumulative epsilon (delta {report.rows[-1].delta:g})" if report.rows else "epsilon")
    axes.set_title(f"privacy spent by {report.client}")
    axes.legend()
    figure.tight_layout()
    try:
        atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=100))
    except OSError as exc:
        raise InputError(f"--plot {path}: cannot write it ({exc.strerror})") from None
    finally:
        plt.close(figure)
