"""What the coordinator runs: the model, local training, compression, pruning, the federation;
the coordinator's own file (`fedglm server`) and the spec it hands its ServerApp."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from fedglm.compression.codecs import CODECS
from fedglm.config.base import ConfigPath, PortNumber, Precision, Section, SiteName
from fedglm.config.release import PublicTextConfig, ReleaseConfig
from fedglm.models.families import Family
from fedglm.models.lora import LoraSpec

LoraTarget = Literal[
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "gate_proj", "up_proj", "down_proj"
]


class ModelConfig(Section):
    """What every party draws itself from the run's seed (LoRA's frozen A matrices). The model
    itself is the base folder (`federation.base`, fedglm/models/base.py)."""

    init_seed: int = 0


class TrainConfig(Section):
    """Local training on each site, sent by the coordinator to every client each round."""

    # Upper bounds: a site runs what the coordinator sends, so nothing here may be infinite or
    # absurd (an infinite learning rate, a billion steps); the steps of a DP round are bounded
    # again after q is known (`MAX_ROUND_STEPS`).
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=3e-3, gt=0.0, le=10.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0, le=10.0)
    local_steps: int | None = Field(default=20, ge=1, le=100_000)
    local_epochs: float | None = Field(default=None, gt=0.0, le=1000.0)
    batch_size: int = Field(default=16, ge=1, le=65536)
    seq_len: int = Field(default=128, ge=8, le=131072)
    grad_clip: float | None = Field(default=1.0, gt=0.0, le=1e6)
    precision: Precision = "auto"
    eval_batch_size: int = Field(default=32, ge=1, le=65536)
    # What sites train and send: every weight (`full`), or LoRA adapters on `lora_targets` of
    # every layer with the rest frozen (`lora`, see fedglm/models/lora.py); no targets: every
    # projection of the model's family (GLM's fused gate_up_proj included).
    adapters: Literal["full", "lora"] = "full"
    lora_rank: int = Field(default=8, ge=1, le=256)
    lora_alpha: float = Field(default=16.0, gt=0.0, le=1e4)
    lora_targets: list[LoraTarget] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_budget(self) -> TrainConfig:
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError("set exactly one of local_steps and local_epochs (the other to null)")
        if self.lora_targets is not None and len(set(self.lora_targets)) != len(self.lora_targets):
            raise ValueError(f"lora_targets lists a projection twice: {self.lora_targets}")
        return self

    def lora_spec(self, init_seed: int, family: Family) -> LoraSpec | None:
        """The adapters every party builds (A drawn from `init_seed`), or None for full training."""
        if self.adapters != "lora":
            return None
        targets = tuple(self.lora_targets) if self.lora_targets is not None else family.projections
        return LoraSpec(self.lora_rank, self.lora_alpha, targets, seed=init_seed + 1)


def _check_codec(name: str) -> str:
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}")
    return name


CodecName = Annotated[str, AfterValidator(_check_codec)]
Density = Annotated[float, Field(gt=0.0, le=1.0)]


class LinkConfig(Section):
    """How one direction of the wire is compressed (see `compression/FORMAT.md`).

    `density`: the fraction of values a sparse codec (`topk`, `ternary`) keeps; ignored by the
    dense ones (`dense`, `fp16`, `int8`). `selection`: `global` keeps the largest values of
    the whole model (tensors that moved more keep more), `per-tensor` keeps `density` of each.
    """

    codec: CodecName = "topk"
    density: Density = 0.1
    selection: Literal["global", "per-tensor"] = "global"


class UplinkConfig(LinkConfig):
    """Client-to-server updates, with error feedback and an optional density warm-up.

    Over the first `warmup_rounds` rounds the density falls geometrically from
    `warmup_density` to `density` (Deep Gradient Compression's warm-up); then it stays there.
    """

    warmup_rounds: int = Field(default=0, ge=0)
    warmup_density: Density = 0.1

    def density_for(self, server_round: int) -> float:
        if server_round > self.warmup_rounds or self.warmup_density <= self.density:
            return self.density
        step = (server_round - 1) / self.warmup_rounds
        return float(self.warmup_density * (self.density / self.warmup_density) ** step)


class CompressionConfig(Section):
    """Both directions. The downlink carries the change of the global model since the version a
    client holds; the server keeps what it did not send (server-side error feedback)."""

    uplink: UplinkConfig = UplinkConfig()
    downlink: LinkConfig = LinkConfig(density=0.3)


class PruneStep(Section):
    """At round `round`, keep in every layer the most important `1 - heads` of the heads and
    `1 - channels` of the SwiGLU channels (fractions of the unpruned counts)."""

    round: int = Field(ge=2)
    heads: float = Field(default=0.0, ge=0.0, lt=1.0)
    channels: float = Field(default=0.0, ge=0.0, lt=1.0)


class PruningConfig(Section):
    """Coordinated structured pruning (`fedglm/pruning.py`): the server sets one mask for all
    sites at the rounds of `schedule`; later rounds fine-tune the smaller model."""

    schedule: list[PruneStep] = Field(default_factory=list)

    @model_validator(mode="after")
    def _increasing(self) -> PruningConfig:
        for before, after in itertools.pairwise(self.schedule):
            if after.round <= before.round:
                raise ValueError(f"schedule rounds must increase, got {before.round} then {after.round}")
            if after.heads < before.heads or after.channels < before.channels:
                raise ValueError(
                    f"the fractions at round {after.round} are below those of round {before.round}; "
                    "pruning only removes (fractions are of the unpruned model)"
                )
        return self

    def step_at(self, server_round: int) -> PruneStep | None:
        return next((s for s in self.schedule if s.round == server_round), None)


class PublicEvalConfig(Section):
    """The coordinator's own evaluation of the global model, each round and of the base (round
    0): the held-out part of public text it names (never a site's records), at no privacy
    cost. `text` as the release's public text (a CSV, JSONL or .txt folder, or generated notes);
    at most `max_records` held-out records are scored."""

    text: PublicTextConfig = PublicTextConfig()
    max_records: int = Field(default=200, ge=1, le=100_000)


class SiteMetricsConfig(Section):
    """The window the coordinator names for the sites' validation metrics released under DP
    (`privacy/metric_release.py`): each record's loss (nats) and bits per byte count within
    +-radius of a centre. Round 0 (the base) uses `first_centre` and `first_radius`, wide
    enough for any loss; each later round centres on the previous round's estimate with
    `radius` (loss, bits per byte). The window moves only the estimate's noise and bias
    (noise std about z * sqrt(3) * radius / records at a site), never the sites' guarantee."""

    radius: tuple[float, float] = (2.0, 1.0)
    first_centre: tuple[float, float] = (8.0, 4.0)
    first_radius: tuple[float, float] = (8.0, 4.0)

    @model_validator(mode="after")
    def _usable(self) -> SiteMetricsConfig:
        for name in ("radius", "first_centre", "first_radius"):
            values = getattr(self, name)
            if not all(0 <= v <= 1e4 for v in values) or (name != "first_centre" and min(values) <= 0):
                raise ValueError(f"site_metrics.{name} is {list(values)}: expected values in (0, 1e4]")
        return self


class SelectionConfig(Section):
    """Which round's model the release takes: the one with the lowest `metric` (a round beats
    the best so far only by more than `min_delta`), and, with `patience`, stop the run after
    that many rounds without a better one. `public_val_loss` needs `public_eval`; `val_loss`
    exists only while the sites share their losses; `dp_val_loss`, the sites' loss released
    under DP, while they release it (noisy: give `min_delta` and `patience` room)."""

    metric: Literal["public_val_loss", "val_loss", "dp_val_loss"] = "public_val_loss"
    patience: int | None = Field(default=None, ge=1, le=100_000)
    min_delta: float = Field(default=0.0, ge=0.0, le=100.0)


class FederationConfig(Section):
    """What the coordinator runs: rounds, sampling, aggregation, model and local training."""

    rounds: int = Field(default=3, ge=1, le=100_000)
    min_clients: int = Field(default=2, ge=1)
    fraction_train: float = Field(default=1.0, gt=0.0, le=1.0)
    weighting: Literal["uniform", "records"] = "uniform"
    # Accept only updates that come with a signed ledger entry (DP-SGD at the site).
    require_dp: bool = True
    round_timeout_s: float = Field(default=900.0, gt=0.0)
    # The largest L2 norm one site's update may add (larger ones are scaled down to it); the
    # round's own bound (4x the sites' lower-median norm) applies too (`server/strategy.py`).
    max_update_norm: float = Field(default=1000.0, gt=0.0, le=1e6)
    # How the bounded updates are combined: the weighted mean, or (robust to a minority of
    # hostile sites, at some cost in loss: bench/robust.py) a coordinate-wise trimmed mean or median.
    aggregation: Literal["mean", "trimmed-mean", "median"] = "mean"
    # The fraction of sites dropped at each end of every coordinate (trimmed-mean only).
    trim_fraction: float = Field(default=0.2, ge=0.0, lt=0.5)
    seed: int = 0
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    compression: CompressionConfig = CompressionConfig()
    pruning: PruningConfig = PruningConfig()
    # The base model: a Hugging Face folder (made by `fedglm pretrain`, or a downloaded GLM-4,
    # GLM, Llama or Qwen2 checkpoint). Every site holds the same folder; its hash is announced.
    base: ConfigPath | None = None
    # The coordinator's evaluation on public text it owns (`public_val_loss` in metrics.jsonl).
    public_eval: PublicEvalConfig | None = None
    # Release the best round's model (and optionally stop early) instead of the last one's.
    selection: SelectionConfig | None = None
    # Ask the sites for their validation metrics under DP (null: ask for none).
    site_metrics: SiteMetricsConfig | None = SiteMetricsConfig()

    @model_validator(mode="after")
    def _schedule_fits(self) -> FederationConfig:
        late = [s.round for s in self.pruning.schedule if s.round > self.rounds]
        if late:
            raise ValueError(f"pruning.schedule has round {late[0]}, after the last round ({self.rounds})")
        if self.selection and self.selection.metric == "public_val_loss" and self.public_eval is None:
            raise ValueError("selection.metric public_val_loss needs a public_eval section (public text)")
        if self.selection and self.selection.metric == "dp_val_loss" and self.site_metrics is None:
            raise ValueError("selection.metric dp_val_loss needs site_metrics (the sites' loss under DP)")
        return self


class TLSConfig(Section):
    """The coordinator's certificate authority and server certificate (see `fedglm certs`)."""

    ca_cert: ConfigPath
    server_cert: ConfigPath
    server_key: ConfigPath


class ListedSite(Section):
    """A hospital the coordinator admits: its name and its SuperNode's public key (`node.pub`)."""

    name: SiteName
    node_key: ConfigPath


class CoordinatorConfig(Section):
    """`fedglm server`: where the SuperLink listens, TLS, the hospitals, the federation, the run folder."""

    host: str = "0.0.0.0"
    port: PortNumber = 9092
    tls: TLSConfig | None = None
    # The hospitals admitted (SuperNode authentication, `fedglm/nodes.py`): required with TLS.
    sites: list[ListedSite] | None = Field(default=None, min_length=1, max_length=10_000)
    out_dir: ConfigPath = Path("runs/coordinator")
    resume: bool = True
    # The key that countersigns ledger entries; made on first start if missing.
    receipt_key: ConfigPath | None = None
    federation: FederationConfig = FederationConfig()
    # Distillation, export and the model card after the last round; none unless asked for.
    release: ReleaseConfig | None = None

    @model_validator(mode="after")
    def _one_name_one_key(self) -> CoordinatorConfig:
        for what, values in (
            ("name", [s.name for s in self.sites or []]),
            ("node_key", [str(s.node_key) for s in self.sites or []]),
        ):
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                raise ValueError(
                    f"sites: {what} {twice[0]} is listed twice (one hospital, one name, one key)"
                )
        return self


class RunSpec(Section):
    """What `fedglm server` hands to its ServerApp: written as JSON into the run folder."""

    federation: FederationConfig
    out_dir: ConfigPath
    resume: bool = True
    receipt_key: ConfigPath
    # Registered node id -> site name (SuperNode authentication on); None: no binding.
    nodes: dict[int, SiteName] | None = None
