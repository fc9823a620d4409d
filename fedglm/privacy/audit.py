"""What `fedglm audit` checks: a site's ledger, its receipts, and every epsilon it claims.

1. The ledger parses (no truncated or malformed line, no duplicate JSON key) and its chain
   holds: every entry matches its hash, is signed by the given public key, has the next
   sequence number and names the previous entry's hash. Budget and delta are the same on
   every line (a raised budget or a changed delta is flagged).
2. Every cumulative epsilon is recomputed over the history up to that entry with Google's
   `dp-accounting` (independent of Opacus, which wrote it; a metric release is a Gaussian
   mechanism on every record, a `PoissonSampledDpEvent` with probability 1, which
   dp-accounting treats as the `GaussianDpEvent` itself): PLD for entries written with the
   PRV accountant, RDP for entries written with RDP (with the orders Opacus used); both are
   shown. The check is one-sided: a claim may be above its recomputation by any amount (a
   conservative accountant; the report says how much), but never below it by more than the
   recomputation's own error (PLD: its discretisation error, estimated as the gap between a
   10x coarser and the default discretisation; RDP: `RDP_RELATIVE_ERROR`).
3. No epsilon passes the budget (the entry's own, or `--budget`): neither the claim nor its
   recomputation (allowing 0.1% of numerical slack in the recomputation).
4. Where the ledger says the site's record count is public (then q reveals it), the epsilon
   of the same history under replace-one neighbouring is reported too (dp-accounting PLD).
5. Where the ledger holds metric releases, the epsilon of its updates alone is reported too:
   the difference is what releasing the validation metrics cost.
6. The verdict says what was proved. The site holds the key that signs its ledger, so it
   could rewrite and re-sign every line (halve q, raise the budget) and the chain would still
   hold. Only the coordinator's receipts pin each entry: with the coordinator's public key and
   its copy of the receipts (`receipts/<site>.jsonl` in its run folder), every entry must have
   a receipt that verifies and names that very entry; the coordinator's copy also holds a
   receipt for any entry cut off the end. Without them the report says the ledger is NOT
   verified against the coordinator, and the CLI exits 3 instead of 0.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path
from typing import Any, Literal

import dp_accounting
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from dp_accounting import pld, rdp

from fedglm.errors import InputError
from fedglm.privacy.accounting import RDP_ORDERS, Release, merged
from fedglm.privacy.keys import key_id
from fedglm.privacy.ledger import LedgerLine, Problem, parse_ledger, release_of, split_releases, verify_chain
from fedglm.privacy.receipts import Receipt, receipt_ok
from fedglm.privacy.site import RECEIPTS_FILE, history

BUDGET_SLACK = 1e-3  # numerical slack of a recomputation against the budget
PLD_INTERVAL = 1e-4  # dp-accounting's default discretisation of the privacy loss
PLD_COARSE_INTERVAL = 1e-3  # to estimate the discretisation error of the default
# dp-accounting's RDP series: float error, and orders it drops for not converging (which only
# raises its value; measured up to 0.07% above Opacus on sites' settings).
RDP_RELATIVE_ERROR = 1e-3
Kind = Literal["pld", "pld-coarse", "pld-replace-one", "rdp"]


def dp_accounting_epsilon(releases: list[Release], delta: float, kind: Kind) -> float:
    """Epsilon of `releases` at `delta` with dp-accounting: PLD (add/remove one record, at the
    default or a coarse discretisation, or replace one record) or RDP at Opacus' orders."""
    return _dp_accounting_epsilon(tuple(sorted(merged(releases), key=astuple)), delta, kind)


@functools.lru_cache(maxsize=1024)
def _dp_accounting_epsilon(releases: tuple[Release, ...], delta: float, kind: Kind) -> float:
    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(r.q, dp_accounting.GaussianDpEvent(r.sigma)), r.steps
        )
        for r in releases
    ]
    if not events:
        return 0.0
    accountant: dp_accounting.PrivacyAccountant
    if kind == "rdp":
        accountant = rdp.RdpAccountant(orders=RDP_ORDERS)
    elif kind == "pld-replace-one":
        accountant = pld.PLDAccountant(dp_accounting.NeighboringRelation.REPLACE_ONE, PLD_INTERVAL)
    else:
        accountant = pld.PLDAccountant(
            value_discretization_interval=PLD_COARSE_INTERVAL if kind == "pld-coarse" else PLD_INTERVAL
        )
    # RDP logs each order it leaves out for not converging (that only makes it looser).
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        accountant.compose(dp_accounting.ComposedDpEvent(events))
        return float(accountant.get_epsilon(delta))
    finally:
        absl_logger.setLevel(level)


@dataclass
class AuditRow:
    line: int
    sequence: int
    run: str
    round: int
    release: str  # "update" (DP-SGD) or "metrics" (validation metrics, the Gaussian mechanism)
    q: float
    sigma: float
    steps: int
    delta: float
    accountant: str
    claimed: float
    pld: float
    rdp: float
    difference: float  # (claimed - recomputed) / recomputed: above it when positive
    allowed_below: float  # the recomputation's own error, relative
    budget: float
    replace_one: float | None  # PLD epsilon under replace-one, where the record count is public
    receipt: str  # "ok", "none", or "bad"


@dataclass
class AuditReport:
    client: str
    key: str
    rows: list[AuditRow]
    problems: list[Problem] = field(default_factory=list)
    receipts_checked: bool = False
    # dp-accounting PLD's epsilon of the updates alone, where the ledger also holds metric releases
    without_metrics: float | None = None

    @property
    def ok(self) -> bool:
        """Nothing failed (which proves the chain and claims only, see `verified`)."""
        return not self.problems

    @property
    def verified(self) -> bool:
        """Nothing failed and every entry is pinned by a receipt of the coordinator."""
        return self.ok and self.receipts_checked

    def as_json(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "key": self.key,
            "ok": self.ok,
            "verified_against_coordinator": self.verified,
            "receipts_checked": self.receipts_checked,
            "epsilon_without_metrics": self.without_metrics,
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
    problems += _changed_terms(lines)
    updates, metric_lines = split_releases(lines)
    if metric_lines:
        report.without_metrics = dp_accounting_epsilon(
            history(updates), float(lines[-1].entry["delta"]), "pld"
        )
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
    if entry["accountant"] == "rdp":
        name, matching, error = "RDP", by_rdp, RDP_RELATIVE_ERROR * by_rdp
    else:
        coarse = dp_accounting_epsilon(releases, delta, "pld-coarse")
        name, matching, error = "PLD", by_pld, max(coarse - by_pld, 0.0)
    difference = (claimed - matching) / matching if matching > 0 else (0.0 if claimed == 0 else math.inf)
    if claimed < matching - error:
        problems.append(
            Problem(
                line.number,
                f"claims epsilon {claimed:.4f}, below dp-accounting {name}'s {matching:.4f} by "
                f"{matching - claimed:.4f}, more than the recomputation's own error {error:.4f}",
            )
        )
    limit = budget if budget is not None else float(entry["budget"])
    if claimed > limit or matching > limit * (1 + BUDGET_SLACK):
        problems.append(
            Problem(line.number, f"epsilon {max(claimed, matching):.4f} exceeds the budget of {limit:g}")
        )
    replace_one = (
        dp_accounting_epsilon(releases, delta, "pld-replace-one") if entry["record_count_public"] else None
    )
    return AuditRow(
        line=line.number,
        sequence=int(entry["sequence"]),
        run=str(entry["run"]),
        round=int(entry["round"]),
        release=release_of(entry),
        q=float(entry["q"]),
        sigma=float(entry["sigma"]),
        steps=int(entry["steps"]),
        delta=delta,
        accountant=str(entry["accountant"]),
        claimed=claimed,
        pld=by_pld,
        rdp=by_rdp,
        difference=difference if math.isfinite(difference) else -1.0,
        allowed_below=error / matching if matching > 0 else 0.0,
        budget=limit,
        replace_one=replace_one,
        receipt="none",
    )


def _changed_terms(lines: list[LedgerLine]) -> list[Problem]:
    """A budget or delta that differs from the line before (a raised budget, a changed delta)."""
    problems = []
    for before, line in itertools.pairwise(lines):
        for name in ("budget", "delta"):
            old, new = before.entry[name], line.entry[name]
            if new != old:
                problems.append(Problem(line.number, f"{name} changed from {old:g} to {new:g}"))
    return problems


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
    for line, row in zip(lines, rows, strict=True):
        if row.receipt == "none":
            problems.append(
                Problem(line.number, f"entry {line.entry['sequence']} has no receipt from the coordinator")
            )


def default_receipts(ledger: Path) -> Path:
    return ledger.parent / RECEIPTS_FILE
