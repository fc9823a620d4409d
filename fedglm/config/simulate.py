"""`fedglm simulate`: the whole federation on one machine."""

from __future__ import annotations

from pydantic import Field, model_validator

from fedglm.config.base import Section
from fedglm.config.federation import (
    FederationConfig,
    PruneStep,
    PruningConfig,
    PublicEvalConfig,
    TrainConfig,
)
from fedglm.config.pretrain import PretrainConfig
from fedglm.config.release import PublicTextConfig, ReleaseConfig
from fedglm.config.site import PrivacyConfig, SiteSpec


class GeneratedCorpusConfig(Section):
    """The built-in corpus: clinical-style notes, non-IID across sites, made deterministically."""

    sites: int = Field(default=3, ge=1, le=64)
    records_per_site: int = Field(default=150, ge=4)
    seed: int = 0


class SimulateConfig(Section):
    """`fedglm simulate`: the whole federation on 127.0.0.1; sites from files or generated."""

    # The default fine-tunes the pretrained base with LoRA adapters and prunes a quarter of the
    # MLP channels at round 2; round 3 recovers.
    # The coordinator also scores each round's model on 50 held-out generated public notes
    # (seed 1: a stream the base was not pretrained on): `public_val_loss`, no privacy spent.
    federation: FederationConfig = FederationConfig(
        min_clients=3,
        train=TrainConfig(adapters="lora", lr=1e-2),
        pruning=PruningConfig(schedule=[PruneStep(round=2, channels=0.25)]),
        public_eval=PublicEvalConfig(text=PublicTextConfig(generated_records=500, seed=1)),
    )
    sites: list[SiteSpec] | None = None
    generated: GeneratedCorpusConfig = GeneratedCorpusConfig()
    # The privacy of the generated sites (sites listed in `sites` carry their own).
    privacy: PrivacyConfig = PrivacyConfig()
    # Distillation, export and the model card after the last round (null: none).
    release: ReleaseConfig | None = ReleaseConfig()
    # Unless federation.base names a base model folder: pretrain a GLM-4 (tokenizer and model)
    # on generated public text into <out>/base/ (kept there and reused), and start from it.
    pretrain: PretrainConfig | None = PretrainConfig(steps=150)

    @model_validator(mode="after")
    def _enough_sites(self) -> SimulateConfig:
        if self.federation.base is None and self.pretrain is None:
            raise ValueError("set federation.base (a model folder) or a pretrain section to make one")
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
