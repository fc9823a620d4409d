"""A site's privacy in one round: plan it (or decline it) before training, record it after.

Files under the site's `state_dir/privacy/`:
- `ledger.jsonl`: the signed ledger (`ledger.py`), verified in full before every round;
- `receipts.jsonl`: the coordinator's receipts for the entries it received;
- `calibration.json`: the calibrated noise multiplier for each set of inputs (a cache);
- `sent-update.bin`: the last update sent, written before its entry (`update_sent` names it);
- `lock`: held from planning a round until its entry is appended, so two ClientApps working
  on one state never plan against the same ledger.

The order in a round is fixed: plan (the epsilon the round would bring, against the budget),
train with DP-SGD, compress, keep the update, append the ledger entry (fsynced), save the
residual, reply. An entry on disk counts as spent whether or not its update ever left.
A release of validation metrics (`metric_release.py`) follows the same order with its own
line: plan, evaluate and noise, append, reply. When the coordinator asks for metrics, a noise
multiplier calibrated to the budget leaves room for one metric release per planned round plus
the base's (round 0; `planned_metric_releases`).

A round is spent once. When the coordinator asks again for a round of its run that the ledger
already holds (it crashed mid-round and resumed from its last checkpoint), the site sends the
very update it recorded, from `sent-update.bin`, at no new privacy cost (the release is the
same); if the coordinator now sends another model, or that update is gone, the site refuses
the round rather than train it twice. Metrics asked for again are sent again from their line,
which holds the released values.

A ledger is never silently behind: every receipt the site holds must name an entry of its
ledger (same sequence, same hash), and a site with a residual from earlier rounds but no
ledger stops. Either means the ledger was lost or rolled back, which would let the site spend
its budget again: restore it (the coordinator keeps a copy of every line it countersigned).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import astuple, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedglm import strict_json
from fedglm.atomic import append_line, atomic_write, atomic_write_text
from fedglm.clients.state import RESIDUAL_FILE
from fedglm.config import PrivacyConfig, SiteSpec
from fedglm.errors import InputError
from fedglm.privacy.accounting import ACCOUNTANT_VERSION, Release, calibrate_sigma, epsilon
from fedglm.privacy.keys import load_private_key
from fedglm.privacy.ledger import (
    LedgerLine,
    append_entry,
    canonical,
    load_own_ledger,
    read_text_file,
    release_of,
)
from fedglm.privacy.metric_release import Released
from fedglm.privacy.receipts import MAX_RECEIPT_CHARS, parse_receipt
from fedglm.protocol import MAX_CATCH_UP

LEDGER_FILE = "ledger.jsonl"
RECEIPTS_FILE = "receipts.jsonl"
CALIBRATION_FILE = "calibration.json"
LOCK_FILE = "lock"
SENT_FILE = "sent-update.bin"
# The most of its budget a site's planned metric releases may take alone, as if nothing else
# were released (composed with training they cost far less: 2.4% of epsilon 8 measured for 4
# releases at z = 5, docs/privacy.md); beyond it the site releases no metrics in the run.
METRICS_SHARE = 0.5


def privacy_dir(state_dir: Path) -> Path:
    return state_dir / "privacy"


def history(lines: list[LedgerLine]) -> list[Release]:
    return [
        Release(float(line.entry["sigma"]), float(line.entry["q"]), int(line.entry["steps"]))
        for line in lines
    ]


@dataclass(frozen=True)
class RoundPlan:
    """The DP-SGD parameters of one round and the epsilon before and after it."""

    q: float
    sigma: float
    steps: int
    expected_batch: float
    epsilon_before: float
    epsilon_after: float


@dataclass(frozen=True)
class Decline:
    epsilon: float  # spent so far
    would_be: float  # after the round

    def reason(self, budget: float) -> str:
        return (
            f"declined: the round would take epsilon from {self.epsilon:.4f} to {self.would_be:.4f}, "
            f"past the site's budget of {budget:g}"
        )


def sample_rate(privacy: PrivacyConfig, *, batch_size: int, n_train: int) -> float:
    if privacy.sample_rate is not None:
        return privacy.sample_rate
    return min(1.0, batch_size / n_train)


def expected_batch(
    privacy: PrivacyConfig, *, q: float, n_train: int, count_public: bool, batch_size: int
) -> float:
    """What the noised sum is divided by: a public value only (see `privacy/dpsgd.py`)."""
    if privacy.expected_batch_size is not None:
        return privacy.expected_batch_size
    if count_public:
        return max(1.0, q * n_train)
    return float(batch_size)


def check_delta(privacy: PrivacyConfig, n_train: int, *, private: bool = True) -> None:
    """Refuse a delta that is not below one over the training records. Raised inside the
    ClientApp (`private`), the message goes to the coordinator: it names no record count."""
    if privacy.delta * n_train < 1.0:
        return
    records = "the number of training records" if private else f"{n_train} training records"
    raise InputError(
        f"privacy.delta = {privacy.delta:g} is not below one over {records}: a mechanism could "
        "then release a whole record; lower delta"
    )


def plan_round(
    privacy: PrivacyConfig,
    lines: list[LedgerLine],
    *,
    q: float,
    steps: int,
    planned_rounds: int,
    n_train: int,
    expected_batch: float,
    cache_dir: Path | None = None,
    metrics_asked: bool = True,
) -> RoundPlan | Decline:
    """The round's noise and epsilon; `Decline` if it would pass the site's budget. A
    calibrated noise leaves room for the run's metric releases if the coordinator asks for
    them (`metrics_asked`, `planned_metric_releases`)."""
    check_delta(privacy, n_train)
    alongside = planned_metric_releases(privacy, planned_rounds, asked=metrics_asked)
    sigma = privacy.noise_multiplier or _calibrated_sigma(
        privacy, q, steps, planned_rounds, alongside, cache_dir
    )
    spent = history(lines)
    before = epsilon(spent, privacy.delta, privacy.accountant)
    after = epsilon([*spent, Release(sigma, q, steps)], privacy.delta, privacy.accountant)
    if after > privacy.epsilon:
        return Decline(before, after)
    return RoundPlan(
        q=q,
        sigma=sigma,
        steps=steps,
        expected_batch=expected_batch,
        epsilon_before=before,
        epsilon_after=after,
    )


def planned_metric_releases(
    privacy: PrivacyConfig, planned_rounds: int, *, asked: bool = True
) -> tuple[Release, ...]:
    """The metric releases a run of `planned_rounds` rounds brings, one per round and the
    base's; none unless the coordinator asks for them (`asked`) and the site allows them, or
    if they alone would take more than `METRICS_SHARE` of the budget (then the site never
    releases its metrics in this run, so training keeps the whole budget)."""
    if not (privacy.enabled and privacy.metrics.enabled and asked):
        return ()
    planned = (Release(privacy.metrics.noise_multiplier, 1.0, planned_rounds + 1),)
    if epsilon(planned, privacy.delta, privacy.accountant, coarse=True) > METRICS_SHARE * privacy.epsilon:
        return ()
    return planned


def _calibrated_sigma(
    privacy: PrivacyConfig,
    q: float,
    steps: int,
    planned_rounds: int,
    alongside: tuple[Release, ...],
    cache_dir: Path | None,
) -> float:
    total_steps = steps * planned_rounds
    key = json.dumps(
        [
            privacy.epsilon,
            privacy.delta,
            q,
            total_steps,
            privacy.accountant,
            [list(astuple(r)) for r in alongside],
        ]
    )
    path = cache_dir / CALIBRATION_FILE if cache_dir is not None else None
    cache: dict[str, float] = {}
    if path is not None and path.exists():
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            cache = {k: float(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}
        except (ValueError, TypeError):
            cache = {}  # a damaged cache is only recomputed
    if key not in cache:
        try:
            cache[key] = calibrate_sigma(
                target_epsilon=privacy.epsilon,
                delta=privacy.delta,
                q=q,
                steps=total_steps,
                accountant=privacy.accountant,
                alongside=alongside,
            )
        except ValueError as exc:
            raise InputError(f"privacy.epsilon = {privacy.epsilon:g} cannot be met: {exc}") from None
        if path is not None:
            atomic_write_text(path, json.dumps(cache, indent=1) + "\n")
    return cache[key]


def config_hash(*sections: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(list(sections))).hexdigest()


def record_round(
    ledger: Path,
    lines: list[LedgerLine],
    plan: RoundPlan,
    privacy: PrivacyConfig,
    key: Ed25519PrivateKey,
    *,
    count_public: bool,
    release: ReleaseContext,
    update_sent: str,
) -> LedgerLine:
    """Append the round's signed entry (fsynced) before its update leaves the site."""
    fields = {
        **release.fields(privacy, count_public),
        "release": "update",
        "sampler": "poisson",
        "q": plan.q,
        "sigma": plan.sigma,
        "steps": plan.steps,
        "clip_norm": privacy.clip_norm,
        "epsilon": plan.epsilon_after,
        "expected_batch": plan.expected_batch,
        "mode": privacy.mode,
        "update_sent": update_sent,
        "metrics": {},
    }
    return append_entry(ledger, lines, fields, key)


@dataclass(frozen=True)
class ReleaseContext:
    """What every ledger line of a release names besides the mechanism: who released it, in
    which run and round, on which model, in which precision, under which settings."""

    client: str
    run: str
    server_round: int
    precision: str
    model_received: str
    config_digest: str

    def fields(self, privacy: PrivacyConfig, count_public: bool) -> dict[str, Any]:
        return {
            "client": self.client,
            "run": self.run,
            "round": self.server_round,
            "unit": privacy.unit,
            "delta": privacy.delta,
            "accountant": privacy.accountant,
            "accountant_version": ACCOUNTANT_VERSION,
            "budget": privacy.epsilon,
            "record_count_public": count_public,
            "precision": self.precision,
            "model_received": self.model_received,
            "config_hash": self.config_digest,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }


@dataclass(frozen=True)
class MetricPlan:
    """A metric release's noise multiplier and the epsilon before and after it."""

    noise_multiplier: float
    epsilon_before: float
    epsilon_after: float


def plan_metric_release(privacy: PrivacyConfig, lines: list[LedgerLine]) -> MetricPlan | Decline:
    """The epsilon one metric release would bring; `Decline` if it would pass the budget."""
    z = privacy.metrics.noise_multiplier
    spent = history(lines)
    before = epsilon(spent, privacy.delta, privacy.accountant)
    after = epsilon([*spent, Release(z, 1.0, 1)], privacy.delta, privacy.accountant)
    if after > privacy.epsilon:
        return Decline(before, after)
    return MetricPlan(z, before, after)


def record_metric_release(
    ledger: Path,
    lines: list[LedgerLine],
    plan: MetricPlan,
    released: Released,
    privacy: PrivacyConfig,
    key: Ed25519PrivateKey,
    *,
    count_public: bool,
    release: ReleaseContext,
) -> LedgerLine:
    """Append the metric release's signed entry (fsynced); the released values are in it."""
    values = released.as_json()
    fields = {
        **release.fields(privacy, count_public),
        "release": "metrics",
        "sampler": "none",
        "q": 1.0,
        "sigma": plan.noise_multiplier,
        "steps": 1,
        "clip_norm": 1.0,
        "epsilon": plan.epsilon_after,
        "expected_batch": 1.0,
        "mode": "gaussian",
        "update_sent": metrics_digest(values),
        "metrics": values,
    }
    return append_entry(ledger, lines, fields, key)


def metrics_digest(values: dict[str, Any]) -> str:
    """What a metrics line's `update_sent` names: the SHA-256 of its released values."""
    return hashlib.sha256(canonical(values)).hexdigest()


def released_before(
    lines: list[LedgerLine], *, run: str, server_round: int, release: str = "update"
) -> LedgerLine | None:
    """This site's `release` entry for round `server_round` of run `run`, if it holds one."""
    for line in reversed(lines):
        same = line.entry["run"] == run and int(line.entry["round"]) == server_round
        if same and release_of(line.entry) == release:
            return line
    return None


def keep_sent(state_dir: Path, blob: bytes) -> None:
    """Keep the update about to be recorded (before its entry), to send it again if asked."""
    atomic_write(privacy_dir(state_dir) / SENT_FILE, lambda handle: handle.write(blob))


def sent_update(state_dir: Path, line: LedgerLine) -> bytes | None:
    """The update `line` recorded as sent, if the site still has it."""
    try:
        blob = (privacy_dir(state_dir) / SENT_FILE).read_bytes()
    except OSError:
        return None
    return blob if hashlib.sha256(blob).hexdigest() == line.entry["update_sent"] else None


def keep_receipt(state_dir: Path, line: str, lines: list[LedgerLine]) -> bool:
    """Store a receipt from the coordinator if it is for one of this site's entries."""
    try:
        parsed = parse_receipt(strict_json.loads(line, max_chars=MAX_RECEIPT_CHARS))
    except strict_json.StrictJSONError:
        return False
    if isinstance(parsed, str):
        return False
    body, _ = parsed
    if not any(x.hash == body["entry_hash"] and x.entry["sequence"] == body["sequence"] for x in lines):
        return False
    path = privacy_dir(state_dir) / RECEIPTS_FILE
    if path.exists() and line in path.read_text(encoding="utf-8").splitlines():
        return True
    append_line(path, line)
    return True


def held_receipts(state_dir: Path) -> list[tuple[int, str]]:
    """(sequence, entry hash) of every well-formed receipt the site holds."""
    path = privacy_dir(state_dir) / RECEIPTS_FILE
    if not path.exists():
        return []
    held = []
    for raw in read_text_file(path, "receipts file").splitlines():
        try:
            parsed = parse_receipt(strict_json.loads(raw, max_chars=MAX_RECEIPT_CHARS))
        except strict_json.StrictJSONError:
            continue
        if not isinstance(parsed, str):
            held.append((int(parsed[0]["sequence"]), str(parsed[0]["entry_hash"])))
    return held


def _check_not_behind(state_dir: Path, path: Path, lines: list[LedgerLine]) -> None:
    """Stop if the ledger lacks an entry the coordinator countersigned, or if it is missing
    although the site has trained before (see the module docstring)."""
    hashes = {int(line.entry["sequence"]): line.hash for line in lines}
    for sequence, entry in sorted(held_receipts(state_dir), reverse=True):
        if hashes.get(sequence) != entry:
            raise InputError(
                f"privacy ledger {path} is behind the coordinator's receipt for its entry {sequence} "
                f"({'missing' if sequence not in hashes else 'different'} there): it was lost or rolled "
                "back; restore it from a backup or from the coordinator's copy "
                f"(<run folder>/ledgers/<site>.jsonl) before training again"
            )
    residual = state_dir / RESIDUAL_FILE
    if not lines and residual.exists():
        raise InputError(
            f"privacy ledger {path} is missing, but {residual} shows this site trained before: restore "
            "the ledger from a backup or from the coordinator's copy (<run folder>/ledgers/<site>.jsonl)"
        )


def open_ledger(state_dir: Path, key: Ed25519PrivateKey) -> tuple[Path, list[LedgerLine]]:
    """The site's ledger, verified in full and checked not to be behind (`InputError` if not)."""
    path = privacy_dir(state_dir) / LEDGER_FILE
    lines = load_own_ledger(path, key.public_key())
    _check_not_behind(state_dir, path, lines)
    return path, lines


def not_countersigned(state_dir: Path, lines: list[LedgerLine]) -> list[LedgerLine]:
    """The entries after the last one the site holds a receipt for (at most `MAX_CATCH_UP`):
    a reply carries them so the coordinator's receipts stay one unbroken chain even when an
    earlier reply never arrived."""
    receipted = [sequence for sequence, _ in held_receipts(state_dir)]
    after = max(receipted, default=-1)
    return [line for line in lines if int(line.entry["sequence"]) > after][-MAX_CATCH_UP:]


@contextmanager
def ledger_lock(state_dir: Path) -> Iterator[None]:
    """Hold the site's privacy lock (blocking): from planning a round until its entry is on disk."""
    folder = privacy_dir(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def describe_site_privacy(site: SiteSpec) -> str:
    """Load the site's key and verify its ledger, and say what the ledger holds."""
    if site.state_dir is None:
        raise InputError(f"site {site.name} has no state_dir")
    key = load_private_key(site.signing_key())
    path, lines = open_ledger(site.state_dir, key)
    privacy = site.privacy
    spent = float(lines[-1].entry["epsilon"]) if lines else 0.0
    return (
        f"{site.name}: DP-SGD per record, budget epsilon {privacy.epsilon:g} at delta {privacy.delta:g}; "
        f"ledger {path} holds {len(lines)} entr{'y' if len(lines) == 1 else 'ies'}, epsilon spent {spent:.4f}"
    )
