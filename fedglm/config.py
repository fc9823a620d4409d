"""Typed configuration: YAML files become frozen, validated objects at the CLI edge.

Every section is a frozen pydantic model that forbids unknown keys. `load_config` turns any
problem (missing file, YAML syntax, unknown key, wrong type, impossible value) into one
`InputError` line naming the file, the key, the value and what is expected. Relative paths in a
file are resolved against that file's folder, so a config means the same from any directory.

Functions below the CLI take flat arguments, not these objects (see docs/design.md).
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from fedglm.compression.codecs import CODECS
from fedglm.errors import InputError
from fedglm.lora import LORA_TARGETS, LoraSpec, LoraTarget
from fedglm.model import GLMArgs

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PortNumber = Annotated[int, Field(ge=1, le=65535)]


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    value = value.expanduser()
    if base is not None and not value.is_absolute():
        value = Path(base) / value
    return value.absolute()


ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


MODEL_PRESETS: dict[str, dict[str, int]] = {
    # about 0.1 M parameters: tests and the quick start
    "tiny": {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 176, "max_seq_len": 128},
    # about 3.3 M parameters: benchmarks on a CPU
    "small": {"d_model": 256, "n_layers": 4, "n_heads": 8, "d_ff": 688, "max_seq_len": 256},
    # about 25 M parameters: benchmarks on a GPU
    "base": {"d_model": 512, "n_layers": 8, "n_heads": 8, "d_ff": 1376, "max_seq_len": 512},
}


class ModelConfig(_Section):
    """Shape of the GLM-style decoder. `preset` fills the sizes; explicit keys override it."""

    preset: Literal["tiny", "small", "base"] = "tiny"
    # Upper bounds keep a config (a site reads the coordinator's) from asking for absurd
    # sizes; what a site can actually hold is checked against its memory (`clients/limits.py`).
    d_model: int = Field(default=64, ge=8, le=16384)
    n_layers: int = Field(default=2, ge=1, le=256)
    n_heads: int = Field(default=4, ge=1, le=256)
    d_ff: int = Field(default=176, ge=8, le=131072)
    max_seq_len: int = Field(default=128, ge=8, le=131072)
    rope_base: float = Field(default=10000.0, gt=1.0, le=1e9)
    norm_eps: float = Field(default=1e-5, gt=0.0, le=1.0)
    init_seed: int = 0

    def glm_args(self) -> GLMArgs:
        sizes = self.model_dump(exclude={"preset", "init_seed"})
        return GLMArgs(**sizes)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            preset = data.get("preset", "tiny")
            if isinstance(preset, str) and preset in MODEL_PRESETS:
                data = {**MODEL_PRESETS[preset], **data}
        return data

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2 != 0:
            raise ValueError(
                f"head size d_model/n_heads = {self.d_model // self.n_heads} must be even "
                "for rotary embeddings"
            )
        return self


class TrainConfig(_Section):
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
    # every layer with the rest frozen (`lora`, see fedglm/lora.py).
    adapters: Literal["full", "lora"] = "full"
    lora_rank: int = Field(default=8, ge=1, le=256)
    lora_alpha: float = Field(default=16.0, gt=0.0)
    lora_targets: list[LoraTarget] = Field(default=list(LORA_TARGETS), min_length=1)

    @model_validator(mode="after")
    def _one_budget(self) -> TrainConfig:
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError("set exactly one of local_steps and local_epochs (the other to null)")
        if len(set(self.lora_targets)) != len(self.lora_targets):
            raise ValueError(f"lora_targets lists a projection twice: {self.lora_targets}")
        return self

    def lora_spec(self, init_seed: int) -> LoraSpec | None:
        """The adapters every party builds (A drawn from `init_seed`), or None for full training."""
        if self.adapters != "lora":
            return None
        return LoraSpec(self.lora_rank, self.lora_alpha, tuple(self.lora_targets), seed=init_seed + 1)


def _check_codec(name: str) -> str:
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}")
    return name


CodecName = Annotated[str, AfterValidator(_check_codec)]
Density = Annotated[float, Field(gt=0.0, le=1.0)]


class LinkConfig(_Section):
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


class CompressionConfig(_Section):
    """Both directions. The downlink carries the change of the global model since the version a
    client holds; the server keeps what it did not send (server-side error feedback)."""

    uplink: UplinkConfig = UplinkConfig()
    downlink: LinkConfig = LinkConfig(density=0.3)


class PruneStep(_Section):
    """At round `round`, keep in every layer the most important `1 - heads` of the heads and
    `1 - channels` of the SwiGLU channels (fractions of the unpruned counts)."""

    round: int = Field(ge=2)
    heads: float = Field(default=0.0, ge=0.0, lt=1.0)
    channels: float = Field(default=0.0, ge=0.0, lt=1.0)


class PruningConfig(_Section):
    """Coordinated structured pruning (`fedglm/pruning.py`): the server sets one mask for all
    sites at the rounds of `schedule`; later rounds fine-tune the smaller model."""

    schedule: list[PruneStep] = []

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


class FederationConfig(_Section):
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
    # A base model made by `fedglm pretrain` (its base.pt, with base.json beside it): the global
    # model starts from it instead of random weights, and its hash is announced to the sites.
    base: ConfigPath | None = None

    @model_validator(mode="after")
    def _window_fits(self) -> FederationConfig:
        shape_from_base = self.base is not None and "model" not in self.model_fields_set
        # (a base's shape is checked once it is read: `pretrain.federation_from_base`)
        if not shape_from_base and self.train.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"train.seq_len ({self.train.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})"
            )
        late = [s.round for s in self.pruning.schedule if s.round > self.rounds]
        if late:
            raise ValueError(f"pruning.schedule has round {late[0]}, after the last round ({self.rounds})")
        return self


class DataConfig(_Section):
    """A site's records: a CSV column, a JSONL field, or a folder of .txt files (UTF-8)."""

    path: ConfigPath
    format: Literal["csv", "jsonl", "txt"] | None = None
    field: str | None = None
    val_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    split_seed: int = 0


class DistillConfig(_Section):
    """`fedglm distill`: the final global model teaches a smaller student on public text.

    The student keeps `layers` of the teacher's layers (evenly spaced, first and last kept;
    default: half, at least one) and, in each, the most important `1 - heads` and
    `1 - channels` of the teacher's heads and channels; it starts from those weights. The loss
    is `alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * next-token loss` at
    temperature `temperature`.
    """

    layers: int | None = Field(default=None, ge=1)
    heads: float = Field(default=0.0, ge=0.0, lt=1.0)
    channels: float = Field(default=0.0, ge=0.0, lt=1.0)
    temperature: float = Field(default=2.0, gt=0.0, le=20.0)
    alpha: float = Field(default=0.7, ge=0.0, le=1.0)
    steps: int = Field(default=300, ge=1)
    lr: float = Field(default=2e-3, gt=0.0)
    batch_size: int = Field(default=16, ge=1)
    seq_len: int = Field(default=128, ge=8)
    seed: int = 0


class ExportConfig(_Section):
    """`fedglm export`: ONNX (fp32, with INT8 and FP16 variants) and a TensorRT engine.

    The fp32 ONNX model must match torch on held-out public text: largest absolute logit
    difference at most `parity_atol` and next-token agreement at least `parity_agreement`, or
    the export fails. The variants' figures are reported. `max_batch` bounds the dynamic batch
    axis (the sequence axis goes up to `model.max_seq_len`).
    """

    formats: list[Literal["onnx", "tensorrt"]] = Field(default=["onnx"], min_length=1)
    int8: bool = True
    fp16: bool = True
    parity_atol: float = Field(default=1e-3, gt=0.0)
    parity_agreement: float = Field(default=0.99, ge=0.0, le=1.0)
    parity_batches: int = Field(default=8, ge=1)
    max_batch: int = Field(default=64, ge=1)


class PublicTextConfig(_Section):
    """Text the coordinator may use: public, never a site's records. `data`: a CSV, JSONL or
    .txt folder (as a site's data section); unset: clinical-style notes the project generates."""

    data: DataConfig | None = None
    generated_records: int = Field(default=600, ge=20)
    seed: int = 0


class ReleaseConfig(_Section):
    """After the last round: distill (unless `distill` is null), export, and write a model card."""

    public_text: PublicTextConfig = PublicTextConfig()
    distill: DistillConfig | None = DistillConfig()
    export: ExportConfig = ExportConfig()


class PretrainConfig(_Section):
    """`fedglm pretrain`: the coordinator trains a base model on public text only.

    `text`: public sources (CSV / JSONL / .txt folders, read as a site's data section); with
    none, clinical-style notes the project generates (`generated_records`, from a stream no
    site uses). Training: AdamW, `warmup_steps` of linear warm-up then cosine decay to a tenth
    of `lr`, over `steps` steps of `batch_size` windows of `seq_len` tokens. Every
    `checkpoint_every` steps the state is saved atomically (and resumed from with `resume`)
    and the held-out loss is measured. The result is `base.pt` with its manifest `base.json`
    in `out_dir` (see fedglm/pretrain.py).
    """

    model: ModelConfig = ModelConfig()
    text: list[DataConfig] = []
    generated_records: int = Field(default=3000, ge=20)
    steps: int = Field(default=600, ge=1)
    batch_size: int = Field(default=32, ge=1)
    seq_len: int = Field(default=128, ge=8)
    lr: float = Field(default=3e-3, gt=0.0)
    warmup_steps: int = Field(default=30, ge=0)
    weight_decay: float = Field(default=0.01, ge=0.0)
    grad_clip: float | None = Field(default=1.0, gt=0.0)
    precision: Precision = "auto"
    checkpoint_every: int = Field(default=100, ge=1)
    seed: int = 0
    out_dir: ConfigPath = Path("runs/pretrain")
    resume: bool = True

    @model_validator(mode="after")
    def _window_fits(self) -> PretrainConfig:
        if self.seq_len > self.model.max_seq_len:
            raise ValueError(f"seq_len ({self.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")
        return self


class TLSConfig(_Section):
    """The coordinator's certificate authority and server certificate (see `fedglm certs`)."""

    ca_cert: ConfigPath
    server_cert: ConfigPath
    server_key: ConfigPath


class ListedSite(_Section):
    """A hospital the coordinator admits: its name and its SuperNode's public key (`node.pub`)."""

    name: SiteName
    node_key: ConfigPath


class CoordinatorConfig(_Section):
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


class ShareConfig(_Section):
    """What a site declares public. Everything else computed from its records stays private.

    `loss`: report training and validation loss to the coordinator. These are computed from
    the records without noise, so declaring them public releases them outside the DP
    guarantee: off by default. `record_count`: the number of training records may be used as
    an aggregation weight, and to derive the sampling rate q (which the ledger publishes).
    """

    loss: bool = False
    record_count: bool = False


class PrivacyConfig(_Section):
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
    `<state_dir>/ledger.key`.
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


def _check_sampling_is_public(privacy: PrivacyConfig, share: ShareConfig) -> None:
    if privacy.enabled and privacy.sample_rate is None and not share.record_count:
        raise ValueError(
            "privacy.sample_rate is not set and share.record_count is false: deriving q from the "
            "record count would publish it; set privacy.sample_rate (e.g. 0.02) or declare "
            "share.record_count: true"
        )


BaseHash = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="64 lower-case hex digits (SHA-256)")]

_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def is_site_name(value: str) -> bool:
    return bool(_SITE_NAME.fullmatch(value))


def _check_site_name(value: str) -> str:
    if not is_site_name(value):
        raise ValueError("use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


SiteName = Annotated[str, AfterValidator(_check_site_name)]


class SiteSpec(_Section):
    """One site as its ClientApp sees it: its name, its records, what it shares, its state."""

    name: SiteName
    data: DataConfig
    share: ShareConfig = ShareConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    state_dir: ConfigPath | None = None
    base_hash: BaseHash | None = None

    @model_validator(mode="after")
    def _public_sampling(self) -> SiteSpec:
        _check_sampling_is_public(self.privacy, self.share)
        return self

    def signing_key(self) -> Path:
        if self.privacy.signing_key is not None:
            return self.privacy.signing_key
        if self.state_dir is None:
            raise ValueError(f"site {self.name} has neither privacy.signing_key nor state_dir")
        return self.state_dir / "ledger.key"


class HospitalConfig(_Section):
    """`fedglm client`: the site's name, the coordinator to reach, its data and local state."""

    site: SiteName
    coordinator: str = Field(pattern=r"^[^\s:]+:\d{1,5}$")
    ca_cert: ConfigPath | None = None
    runtime_port: PortNumber = 9094
    state_dir: ConfigPath = Path("fedglm-state")
    # The SuperNode's private key (`fedglm/nodes.py`); default `<state_dir>/node.key`, made on
    # first start. Its public half `node.pub` goes to the coordinator.
    node_key: ConfigPath | None = None
    data: DataConfig
    share: ShareConfig = ShareConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    # Accept only a federation that starts from this base model (the `model_hash` in the
    # base.json of `fedglm pretrain`); unset: any base, or none.
    base_hash: BaseHash | None = None

    @model_validator(mode="after")
    def _public_sampling(self) -> HospitalConfig:
        _check_sampling_is_public(self.privacy, self.share)
        return self

    def site_spec(self) -> SiteSpec:
        return SiteSpec(
            name=self.site,
            data=self.data,
            share=self.share,
            privacy=self.privacy,
            state_dir=self.state_dir,
            base_hash=self.base_hash,
        )


class GeneratedCorpusConfig(_Section):
    """The built-in corpus: clinical-style notes, non-IID across sites, made deterministically."""

    sites: int = Field(default=3, ge=1, le=64)
    records_per_site: int = Field(default=150, ge=4)
    seed: int = 0


class SimulateConfig(_Section):
    """`fedglm simulate`: the whole federation on 127.0.0.1; sites from files or generated."""

    # The default fine-tunes the pretrained base (hence the lower learning rate) and prunes a
    # quarter of the SwiGLU channels at round 2; round 3 recovers.
    federation: FederationConfig = FederationConfig(
        min_clients=3,
        train=TrainConfig(lr=5e-4),
        pruning=PruningConfig(schedule=[PruneStep(round=2, channels=0.25)]),
    )
    sites: list[SiteSpec] | None = None
    generated: GeneratedCorpusConfig = GeneratedCorpusConfig()
    # The privacy of the generated sites (sites listed in `sites` carry their own).
    privacy: PrivacyConfig = PrivacyConfig()
    # Distillation, export and the model card after the last round (null: none).
    release: ReleaseConfig | None = ReleaseConfig()
    # Unless federation.base names a base model: pretrain one of federation.model's shape on
    # generated public text into <out>/base/ (kept there and reused), and start from it.
    # null: start from random weights.
    pretrain: PretrainConfig | None = PretrainConfig(steps=300)

    @model_validator(mode="after")
    def _enough_sites(self) -> SimulateConfig:
        n_sites = len(self.sites) if self.sites is not None else self.generated.sites
        if self.sites is not None:
            names = [s.name for s in self.sites]
            if len(set(names)) != len(names):
                raise ValueError(f"site names must be unique, got {names}")
        dp_sites = [s.privacy for s in self.sites] if self.sites is not None else [self.privacy]
        if self.federation.train.precision == "fp16" and any(p.enabled for p in dp_sites):
            raise ValueError(
                "federation.train.precision fp16 with DP-SGD is refused (a gradient scaler makes "
                "per-record norms overflow); use bf16, fp32 or auto"
            )
        if self.federation.require_dp and not all(p.enabled for p in dp_sites):
            raise ValueError(
                "federation.require_dp is true but a site has privacy.enabled false; "
                "enable DP at every site or set require_dp: false"
            )
        if self.federation.min_clients > n_sites:
            raise ValueError(
                f"federation.min_clients ({self.federation.min_clients}) is more than the "
                f"{n_sites} simulated sites"
            )
        return self


ConfigT = TypeVar("ConfigT", bound=BaseModel)


MAX_CONFIG_BYTES = 1 << 20  # a real config is a few kilobytes


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors and aliases: a few hundred bytes of nested aliases expand to
    billions of nodes (a "billion laughs"), and no fedglm config needs them."""

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            message = "aliases (*name) are not allowed in fedglm configs; write the value out"
            raise yaml.composer.ComposerError(None, None, message, mark)
        return super().compose_node(parent, index)


def load_config(path: Path, cls: type[ConfigT]) -> ConfigT:
    """Read a YAML file into `cls`, or raise one `InputError` line saying what to fix."""
    if not path.is_file():
        raise InputError(f"config file {path} does not exist (or is not a file)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise InputError(f"config file {path} is {path.stat().st_size:,} bytes; a config is at most 1 MiB")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_NoAliasLoader)  # a SafeLoader
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid UTF-8 at byte {exc.start}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return validate_config(data, cls, source=str(path), base_dir=path.parent)


def validate_config(
    data: dict[str, Any], cls: type[ConfigT], *, source: str, base_dir: Path | None = None
) -> ConfigT:
    """Validate a mapping into `cls`; errors become one `InputError` line."""
    try:
        return cls.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise InputError(f"{source}: {describe_validation_error(exc, cls)}") from None


def describe_validation_error(exc: ValidationError, cls: type[BaseModel]) -> str:
    """The first problem in `exc` as 'key = value: what is expected' (plus a count of others)."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = [part for part in first["loc"] if not isinstance(part, str) or part]
    key = ".".join(str(part) for part in loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(cls, loc[:-1])
        message = f"unknown key '{key}'" + (f"; allowed here: {', '.join(allowed)}" if allowed else "")
    elif first["type"] == "missing":
        message = f"missing required key '{key}'"
    else:
        reason = first["msg"].removeprefix("Value error, ")
        value = first.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        message = f"{key}{shown}: {reason}"
    more = len(errors) - 1
    return message + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def _allowed_keys(cls: type[BaseModel], loc: list[Any]) -> list[str]:
    current: Any = cls
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = _model_in(field.annotation)
        if current is None:
            return []
    return sorted(getattr(current, "model_fields", {}))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


class RunSpec(_Section):
    """What `fedglm server` hands to its ServerApp: written as JSON into the run folder."""

    federation: FederationConfig
    out_dir: ConfigPath
    resume: bool = True
    receipt_key: ConfigPath
    # Registered node id -> site name (SuperNode authentication on); None: no binding.
    nodes: dict[int, SiteName] | None = None
