"""Typed configuration: YAML files become frozen, validated objects at the CLI edge.

Every section is a frozen pydantic model that forbids unknown keys (`base.py`); `load_config`
turns any problem into one `InputError` line (`loading.py`). The sections are grouped by who
writes them: the coordinator (`federation.py`), a hospital (`site.py`), the release after the
last round (`release.py`), pretraining (`pretrain.py`) and the simulation (`simulate.py`).
Commands load a config at the CLI edge and hand its sections down; a function below takes the
section it needs (or plain values), never a whole file's config.
"""

from __future__ import annotations

from fedglm.config.base import BaseHash, ConfigPath, PortNumber, Precision, Section, SiteName, is_site_name
from fedglm.config.federation import (
    CodecName,
    CompressionConfig,
    CoordinatorConfig,
    Density,
    FederationConfig,
    LinkConfig,
    ListedSite,
    LoraTarget,
    ModelConfig,
    PruneStep,
    PruningConfig,
    PublicEvalConfig,
    RunSpec,
    SelectionConfig,
    SiteMetricsConfig,
    TLSConfig,
    TrainConfig,
    UplinkConfig,
)
from fedglm.config.loading import (
    MAX_CONFIG_BYTES,
    ConfigT,
    describe_validation_error,
    load_config,
    validate_config,
)
from fedglm.config.pretrain import PretrainConfig, PretrainModelConfig
from fedglm.config.release import DistillConfig, ExportConfig, PublicTextConfig, ReleaseConfig
from fedglm.config.simulate import GeneratedCorpusConfig, SimulateConfig
from fedglm.config.site import DataConfig, HospitalConfig, PrivacyConfig, ShareConfig, SiteSettings, SiteSpec

__all__ = [
    "MAX_CONFIG_BYTES",
    "BaseHash",
    "CodecName",
    "CompressionConfig",
    "ConfigPath",
    "ConfigT",
    "CoordinatorConfig",
    "DataConfig",
    "Density",
    "DistillConfig",
    "ExportConfig",
    "FederationConfig",
    "GeneratedCorpusConfig",
    "HospitalConfig",
    "LinkConfig",
    "ListedSite",
    "LoraTarget",
    "ModelConfig",
    "PortNumber",
    "Precision",
    "PretrainConfig",
    "PretrainModelConfig",
    "PrivacyConfig",
    "PruneStep",
    "PruningConfig",
    "PublicEvalConfig",
    "PublicTextConfig",
    "ReleaseConfig",
    "RunSpec",
    "Section",
    "SelectionConfig",
    "ShareConfig",
    "SimulateConfig",
    "SiteMetricsConfig",
    "SiteName",
    "SiteSettings",
    "SiteSpec",
    "TLSConfig",
    "TrainConfig",
    "UplinkConfig",
    "describe_validation_error",
    "is_site_name",
    "load_config",
    "validate_config",
]
