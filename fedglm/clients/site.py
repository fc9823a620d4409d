"""The site as its ClientApp sees it: its spec, its records, its state folder, what it shares.

`fedglm client` writes the site's spec (`site-spec.json`: name, data, what it shares, where its
state lives) and hands its path to the SuperNode as the node config value `fedglm-site`; the
ClientApp reads it for each message. The records never leave the ClientApp's process.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, MetricRecord

from fedglm.config import SiteSpec
from fedglm.data import SiteData, load_records, split_records
from fedglm.errors import InputError
from fedglm.privacy.site import check_delta

SITE_KEY = "fedglm-site"
SITE_NAME = "site-spec.json"


def read_site(context: Context) -> SiteSpec:
    path = context.node_config.get(SITE_KEY)
    if not isinstance(path, str):
        raise InputError(f"node config has no '{SITE_KEY}': start SuperNodes with `fedglm client`")
    return SiteSpec.model_validate_json(Path(path).read_text(encoding="utf-8"))


def load_site_data(site: SiteSpec) -> SiteData:
    records = load_records(site.data.path, site.data.format, site.data.field)
    return split_records(records, site.data.val_fraction, site.data.split_seed)


def describe_site_data(site: SiteSpec) -> str:
    """Read and split the site's records as training will, check privacy.delta against them
    (with the count: this runs before the site connects, not in the ClientApp), and say what
    was found."""
    data = load_site_data(site)
    if site.privacy.enabled:
        check_delta(site.privacy, len(data.train), private=False)
    return (
        f"{site.name}: {len(data.train) + len(data.val)} records in {site.data.path} "
        f"({len(data.train)} train, {len(data.val)} validation)"
    )


def state_dir(site: SiteSpec) -> Path:
    if site.state_dir is None:
        raise InputError(f"site {site.name} has no state_dir: start SuperNodes with `fedglm client`")
    return site.state_dir


def public_metrics(site: SiteSpec, n_records: int, **losses: float) -> MetricRecord:
    """The metrics a reply carries: a weight (1, or the record count if the site shares it) and
    the losses only if the site declared them public."""
    metrics = MetricRecord({"weight": float(n_records) if site.share.record_count else 1.0})
    metrics["records-public"] = int(site.share.record_count)
    if site.share.loss:
        for key, value in losses.items():
            metrics[key] = value
    return metrics
