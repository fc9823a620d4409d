"""A real ledger for the privacy tests, written by the code path a site uses."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedglm.atomic import append_line
from fedglm.config import PrivacyConfig
from fedglm.privacy import metric_release
from fedglm.privacy.keys import load_private_key, make_keys
from fedglm.privacy.ledger import LedgerLine
from fedglm.privacy.receipts import make_receipt
from fedglm.privacy.site import (
    MetricPlan,
    ReleaseContext,
    RoundPlan,
    open_ledger,
    plan_metric_release,
    plan_round,
    record_metric_release,
    record_round,
)


@dataclass
class Site:
    state_dir: Path
    key: Ed25519PrivateKey
    ledger: Path
    server_key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    @property
    def receipts(self) -> Path:
        """The coordinator's copy of this site's receipts."""
        return self.state_dir / "coordinator-receipts.jsonl"

    @property
    def public(self) -> Ed25519PublicKey:
        return self.key.public_key()

    def lines(self) -> list[LedgerLine]:
        return open_ledger(self.state_dir, self.key)[1]


def new_site(tmp_path: Path, name: str = "site") -> Site:
    state_dir = tmp_path / name
    private, _ = make_keys(state_dir, "ledger")
    key = load_private_key(private)
    return Site(state_dir, key, open_ledger(state_dir, key)[0])


def release(
    site: Site,
    privacy: PrivacyConfig,
    *,
    server_round: int,
    q: float = 0.05,
    steps: int = 20,
    planned_rounds: int = 4,
    n_train: int = 1000,
) -> LedgerLine | None:
    """Plan a round and, unless declined, record it as a site does (None when declined)."""
    lines = site.lines()
    plan = plan_round(
        privacy,
        lines,
        q=q,
        steps=steps,
        planned_rounds=planned_rounds,
        n_train=n_train,
        expected_batch=16.0,
        cache_dir=site.state_dir,
    )
    if not isinstance(plan, RoundPlan):
        return None
    return record_round(
        site.ledger,
        lines,
        plan,
        privacy,
        site.key,
        count_public=False,
        release=context(server_round),
        update_sent=f"{server_round:064x}",
    )


def context(server_round: int) -> ReleaseContext:
    return ReleaseContext(
        client="site-a",
        run="run-1",
        server_round=server_round,
        precision="fp32",
        model_received="ab" * 32,
        config_digest="cd" * 32,
    )


def release_metrics(site: Site, privacy: PrivacyConfig, *, server_round: int) -> LedgerLine | None:
    """Plan a metric release and, unless declined, record it as a site does."""
    lines = site.lines()
    plan = plan_metric_release(privacy, lines)
    if not isinstance(plan, MetricPlan):
        return None
    per_record = [(3.0 + 0.01 * i, 1.5) for i in range(100)]
    released = metric_release.release(per_record, WINDOW, plan.noise_multiplier)
    return record_metric_release(
        site.ledger,
        lines,
        plan,
        released,
        privacy,
        site.key,
        count_public=False,
        release=context(server_round),
    )


WINDOW = metric_release.Window((3.0, 1.5), (2.0, 1.0))


def ledger_of(tmp_path: Path, rounds: int = 4, sigma: float = 1.0) -> Site:
    """A site's ledger of `rounds` entries, each countersigned by the coordinator."""
    site = new_site(tmp_path)
    privacy = PrivacyConfig(noise_multiplier=sigma, epsilon=50.0, sample_rate=0.05)
    for server_round in range(1, rounds + 1):
        line = release(site, privacy, server_round=server_round)
        assert line is not None
        append_line(site.receipts, json.dumps(make_receipt(line, site.server_key)))
    return site
