"""What a hospital configures: its records, what it declares public, its privacy budget, and
its file for `fedglm client` (`HospitalConfig`), which it hands its ClientApp as a `SiteSpec`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from fedglm.config.base import ConfigPath, PortNumber, Section, SiteName


class DataConfig(Section):
    """A site's records: a CSV column, a JSONL field, or a folder of .txt files (UTF-8)."""

    path: ConfigPath
    format: Literal["csv", "jsonl", "txt"] | None = None
    field: str | None = None
    val_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    split_seed: int = 0


class ShareConfig(Section):
    """What a site declares public. Everything else computed from its records stays private.

    `loss`: report training and validation loss to the coordinator. These are computed from
    the records without noise, so declaring them public releases them outside the DP
    guarantee: off by default. `record_count`: the number of training records may be used as
    an aggregation weight, and to derive the sampling rate q (which the ledger publishes).
    """

    loss: bool = False
    record_count: bool = False


class MetricsPrivacyConfig(Section):
    """The site's validation metrics, released under DP each time the coordinator evaluates
    (`privacy/metric_release.py`): the Gaussian mechanism with `noise_multiplier` on clipped
    per-record losses, recorded in the ledger and counted in the budget. With `enabled`
    false the coordinator learns nothing of the site's validation loss (unless `share.loss`).
    """

    enabled: bool = True
    noise_multiplier: float = Field(default=5.0, ge=0.5, le=1e4)


class PrivacyConfig(Section):
    """A site's differential privacy: DP-SGD with Opacus, and the budget it never exceeds.

    The unit of privacy is the record (one patient note): neighbouring data sets differ by one
    record, added or removed. `epsilon` and `delta` are the site's budget over everything its
    ledger records; a round that would take epsilon past it is declined. The noise multiplier
    is `noise_multiplier` when set, else calibrated so that `rounds` rounds (default: all the
    rounds of the run) spend exactly the budget. `sample_rate` is q, the public probability
    with which each record is drawn at each step; when unset it is the coordinator's
    `train.batch_size` over the site's training record count, which needs
    `share.record_count: true` (q is published in the ledger). `expected_batch_size` is the
    public number the noised sum of clipped gradients is divided by (recorded in the ledger):
    when unset, q times the record count if that count is public, else the coordinator's
    `train.batch_size`; never anything computed from private data. `accountant`: prv (default) or
    rdp. `mode`: hooks (per-record gradients) or ghost (ghost clipping, less memory, fp32).
    `signing_key`: the Ed25519 key that signs the ledger (`fedglm keys`), by default
    `<state_dir>/ledger.key`. `metrics`: the validation metrics released under DP; the
    calibrated noise multiplier leaves room for them (one release per round, and the base's).
    """

    enabled: bool = True
    unit: Literal["record"] = "record"
    epsilon: float = Field(default=8.0, gt=0.0, le=100.0)
    delta: float = Field(default=1e-5, gt=0.0, le=1e-3)
    noise_multiplier: float | None = Field(default=None, gt=0.0, le=1e4)
    rounds: int | None = Field(default=None, ge=1, le=100_000)
    clip_norm: float = Field(default=1.0, gt=0.0, le=1e6)
    sample_rate: float | None = Field(default=None, gt=0.0, le=1.0)
    expected_batch_size: float | None = Field(default=None, ge=1.0, le=1e7)
    accountant: Literal["prv", "rdp"] = "prv"
    mode: Literal["hooks", "ghost"] = "hooks"
    signing_key: ConfigPath | None = None
    metrics: MetricsPrivacyConfig = MetricsPrivacyConfig()


def _check_sampling_is_public(privacy: PrivacyConfig, share: ShareConfig) -> None:
    if privacy.enabled and privacy.sample_rate is None and not share.record_count:
        raise ValueError(
            "privacy.sample_rate is not set and share.record_count is false: deriving q from the "
            "record count would publish it; set privacy.sample_rate (e.g. 0.02) or declare "
            "share.record_count: true"
        )


class SiteSettings(Section):
    """What a site brings to every round, whoever runs it: its records, what it declares
    public, its privacy, the base model it accepts. `SiteSpec` and `HospitalConfig` add where
    it runs."""

    data: DataConfig
    share: ShareConfig = ShareConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    # The base model this site fine-tunes: its own copy of the Hugging Face folder the
    # coordinator names. The site takes part only in runs that announce this folder's hash.
    # (Required of a hospital; a simulation gives its sites the federation's base.)
    base: ConfigPath | None = None

    @model_validator(mode="after")
    def _public_sampling(self) -> SiteSettings:
        _check_sampling_is_public(self.privacy, self.share)
        return self


class SiteSpec(SiteSettings):
    """One site as its ClientApp sees it: its name, its records, what it shares, its state."""

    name: SiteName
    state_dir: ConfigPath | None = None

    def signing_key(self) -> Path:
        if self.privacy.signing_key is not None:
            return self.privacy.signing_key
        if self.state_dir is None:
            raise ValueError(f"site {self.name} has neither privacy.signing_key nor state_dir")
        return self.state_dir / "ledger.key"


class HospitalConfig(SiteSettings):
    """`fedglm client`: the site's name, the coordinator to reach, its data and local state."""

    site: SiteName
    base: ConfigPath
    coordinator: str = Field(pattern=r"^[^\s:]+:\d{1,5}$")
    ca_cert: ConfigPath | None = None
    runtime_port: PortNumber = 9094
    state_dir: ConfigPath = Path("fedglm-state")
    # The SuperNode's private key (`fedglm/nodes.py`); default `<state_dir>/node.key`, made on
    # first start. Its public half `node.pub` goes to the coordinator.
    node_key: ConfigPath | None = None

    def site_spec(self) -> SiteSpec:
        shared = {name: getattr(self, name) for name in SiteSettings.model_fields}
        return SiteSpec(name=self.site, state_dir=self.state_dir, **shared)
