"""What `fedglm audit` checks: a site's ledger, its receipts, and every epsilon it claims.

1. The ledger parses (no truncated or malformed line) and its chain holds: every entry
   matches its hash, is signed by the given public key, has the next sequence number and
   names the previous entry's hash.
2. Every cumulative epsilon is recomputed over the history up to that entry with Google's
   `dp-accounting` (independent of Opacus, which wrote it): PLD for entries written with the
   PRV accountant, RDP for entries written with RDP; both are shown. A claim more than 1% away
   from its recomputation is a failure.
3. No epsilon passes the budget (the entry's own, or `--budget`): neither the claim nor its
   recomputation (allowing 0.1% of numerical slack in the recomputation).
4. With the coordinator's public key, every receipt must verify and name an entry of this
   ledger by sequence and hash. An entry without a receipt is reported, not failed: a site that
   crashed after writing an entry counts it as spent although the update never arrived. Use
   the coordinator's copy of the receipts (`receipts/<site>.jsonl` in its run folder) to also
   catch entries deleted together with their receipts.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path
from typing import Any

import dp_accounting
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from dp_accounting import pld, rdp

from fedglm.errors import InputError
from fedglm.privacy.accounting import Release, merged, relative_difference
from fedglm.privacy.keys import key_id
from fedglm.privacy.ledger import LedgerLine, Problem, parse_ledger, verify_chain
from fedglm.privacy.receipts import Receipt, receipt_ok
from fedglm.privacy.site import RECEIPTS_FILE, history

CLAIM_TOLERANCE = 0.01  # a claim may differ from its recomputation by 1%
BUDGET_SLACK = 1e-3  # numerical slack of a recomputation against the budget


def dp_accounting_epsilon(releases: list[Release], delta: float, kind: str) -> float:
    """Epsilon of `releases` at `delta` with dp-accounting's PLD or RDP accountant."""
    return _dp_accounting_epsilon(tuple(sorted(merged(releases), key=astuple)), delta, kind)


@functools.lru_cache(maxsize=1024)
def _dp_accounting_epsilon(releases: tuple[Release, ...], delta: float, kind: str) -> float:
    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(r.q, dp_accounting.GaussianDpEvent(r.sigma)), r.steps
        )
        for r in releases
    ]
    if not events:
        return 0.0
    accountant = pld.PLDAccountant() if kind == "pld" else rdp.RdpAccountant()
    accountant.compose(dp_accounting.ComposedDpEvent(events))
    # RDP logs each order it leaves out for not converging (that only makes it looser).
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        return float(accountant.get_epsilon(delta))
    finally:
        absl_logger.setLevel(level)


@dataclass
class AuditRow:
    line: int
    sequence: int
    run: str
    round: int
    q: float
    sigma: float
    steps: int
    delta: float
    accountant: str
    claimed: float
    pld: float
    rdp: float
    difference: float  # relative, against the matching recomputation
    budget: float
    receipt: str  # "ok", "none", or "bad"


@dataclass
class AuditReport:
    client: str
    key: str
    rows: list[AuditRow]
    problems: list[Problem] = field(default_factory=list)
    receipts_checked: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "key": self.key,
            "ok": self.ok,
            "receipts_checked": self.receipts_checked,
            "problems": [str(p) for p in self.problems],
            "rows": [asdict(r) for r in self.rows],
        }


def audit_ledger(
    text: str,
    key: Ed25519PublicKey,
    *,
    budget: float | None = None,
    server_key: Ed25519PublicKey | None = None,
    receipts: tuple[list[Receipt], list[Problem]] | None = None,
) -> AuditReport:
    """Everything of the module docstring, over a ledger's text."""
    lines, problems = parse_ledger(text)
    if not lines and not problems:
        raise InputError("the ledger holds no entries; is this the right file?")
    problems += verify_chain(lines, key)
    report = AuditReport(client=lines[0].entry["client"] if lines else "?", key=key_id(key), rows=[])
    for index, line in enumerate(lines):
        report.rows.append(_recompute(line, lines[: index + 1], budget, problems))
    if server_key is not None and receipts is not None:
        report.receipts_checked = True
        _check_receipts(lines, report.rows, server_key, receipts, problems)
    report.problems = sorted(problems, key=lambda p: p.line)
    return report


def _recompute(
    line: LedgerLine, upto: list[LedgerLine], budget: float | None, problems: list[Problem]
) -> AuditRow:
    entry = line.entry
    delta = float(entry["delta"])
    releases = history(upto)
    by_pld = dp_accounting_epsilon(releases, delta, "pld")
    by_rdp = dp_accounting_epsilon(releases, delta, "rdp")
    claimed = float(entry["epsilon"])
    matching = by_rdp if entry["accountant"] == "rdp" else by_pld
    difference = relative_difference(claimed, matching)
    if difference > CLAIM_TOLERANCE:
        name = "RDP" if entry["accountant"] == "rdp" else "PLD"
        problems.append(
            Problem(
                line.number,
                f"claims epsilon {claimed:.4f}; dp-accounting {name} gives {matching:.4f} "
                f"({100 * difference:.2f}% apart, more than {100 * CLAIM_TOLERANCE:g}%)",
            )
        )
    limit = budget if budget is not None else float(entry["budget"])
    if claimed > limit or matching > limit * (1 + BUDGET_SLACK):
        problems.append(
            Problem(line.number, f"epsilon {max(claimed, matching):.4f} exceeds the budget of {limit:g}")
        )
    return AuditRow(
        line=line.number,
        sequence=int(entry["sequence"]),
        run=str(entry["run"]),
        round=int(entry["round"]),
        q=float(entry["q"]),
        sigma=float(entry["sigma"]),
        steps=int(entry["steps"]),
        delta=delta,
        accountant=str(entry["accountant"]),
        claimed=claimed,
        pld=by_pld,
        rdp=by_rdp,
        difference=difference if math.isfinite(difference) else -1.0,
        budget=limit,
        receipt="none",
    )


def _check_receipts(
    lines: list[LedgerLine],
    rows: list[AuditRow],
    server_key: Ed25519PublicKey,
    receipts: tuple[list[Receipt], list[Problem]],
    problems: list[Problem],
) -> None:
    found, unreadable = receipts
    problems.extend(unreadable)
    by_sequence = {int(line.entry["sequence"]): (line, row) for line, row in zip(lines, rows, strict=True)}
    for receipt in found:
        body = receipt.body
        where = f"receipt {receipt.number}"
        if not receipt_ok(receipt, server_key):
            problems.append(Problem(0, f"{where}: does not verify with the coordinator's public key"))
            continue
        match = by_sequence.get(int(body["sequence"]))
        if match is None:
            problems.append(
                Problem(0, f"{where}: countersigns entry {body['sequence']}, which the ledger does not hold")
            )
            continue
        line, row = match
        same = (
            body["entry_hash"] == line.hash
            and body["client"] == line.entry["client"]
            and body["run"] == line.entry["run"]
            and body["round"] == line.entry["round"]
            and body["site_key"] == line.entry["key"]
        )
        if not same:
            row.receipt = "bad"
            problems.append(
                Problem(line.number, f"{where} countersigned a different entry at this sequence (rewritten)")
            )
        elif row.receipt != "bad":
            row.receipt = "ok"


def default_receipts(ledger: Path) -> Path:
    return ledger.parent / RECEIPTS_FILE
