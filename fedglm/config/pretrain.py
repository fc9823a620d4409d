"""`fedglm pretrain`: the base model, trained on public text only."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from fedglm.config.base import ConfigPath, Precision, Section
from fedglm.config.site import DataConfig
from fedglm.models.presets import PRESETS


class PretrainModelConfig(Section):
    """The GLM-4 preset to train (fedglm/models/presets.py) and its tokenizer's vocabulary."""

    preset: Literal["tiny", "small", "base"] = "tiny"
    vocab_size: int = Field(default=2000, ge=300, le=262_144)
    init_seed: int = 0

    @property
    def max_positions(self) -> int:
        return PRESETS[self.preset][-1]


class PretrainConfig(Section):
    """`fedglm pretrain`: the coordinator trains a base model on public text only.

    `text`: public sources (CSV / JSONL / .txt folders, read as a site's data section); with
    none, clinical-style notes the project generates (`generated_records`, from a stream no
    site uses). Training: AdamW, `warmup_steps` of linear warm-up then cosine decay to a tenth
    of `lr`, over `steps` steps of `batch_size` windows of `seq_len` tokens. Every
    `checkpoint_every` steps the state is saved atomically (and resumed from with `resume`)
    and the held-out loss is measured. The result is a Hugging Face folder `out_dir/model`
    (GLM-4 weights and the byte-level BPE tokenizer trained first on the same public text) with
    the manifest `out_dir/base.json` (see fedglm/pretrain.py).
    """

    model: PretrainModelConfig = PretrainModelConfig()
    text: list[DataConfig] = Field(default_factory=list)
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
        if self.seq_len > self.model.max_positions:
            raise ValueError(
                f"seq_len ({self.seq_len}) exceeds the {self.model.preset} preset's "
                f"{self.model.max_positions} positions"
            )
        return self
