"""What a site's replies may carry: nothing computed from its records unless declared public."""

from __future__ import annotations

from pathlib import Path

from fedglm.clients.site import public_metrics
from fedglm.config import DataConfig, PrivacyConfig, ShareConfig, SiteSpec


def site(share: ShareConfig) -> SiteSpec:
    return SiteSpec(
        name="h1",
        data=DataConfig(path=Path("notes.csv"), field="text"),
        share=share,
        privacy=PrivacyConfig(sample_rate=0.05),
        base=Path("model"),
    )


def test_by_default_no_loss_and_no_record_count_leave_the_site() -> None:
    metrics = public_metrics(site(ShareConfig()), 1234, train_loss=2.5)
    assert dict(metrics) == {"weight": 1.0, "records-public": 0}


def test_declared_losses_and_counts_are_sent() -> None:
    metrics = public_metrics(site(ShareConfig(loss=True, record_count=True)), 1234, val_loss=2.5)
    assert dict(metrics) == {"weight": 1234.0, "records-public": 1, "val_loss": 2.5}
