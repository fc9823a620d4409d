"""What happens after the last round: distillation on public text, export, the model card."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedglm.config.base import Section
from fedglm.config.site import DataConfig


class DistillConfig(Section):
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


class ExportConfig(Section):
    """`fedglm export`: ONNX (fp32, with INT8 and FP16 variants) and a TensorRT engine.

    The fp32 ONNX model must match torch on held-out public text: largest absolute logit
    difference at most `parity_atol` and next-token agreement at least `parity_agreement`, or
    the export fails. The variants' figures are reported. `max_batch` bounds the dynamic batch
    axis (the sequence axis goes up to the model's positions); `seq_len` is the window of the
    parity and held-out checks.
    """

    formats: list[Literal["onnx", "tensorrt"]] = Field(default=["onnx"], min_length=1)
    int8: bool = True
    fp16: bool = True
    parity_atol: float = Field(default=1e-3, gt=0.0)
    parity_agreement: float = Field(default=0.99, ge=0.0, le=1.0)
    parity_batches: int = Field(default=8, ge=1)
    max_batch: int = Field(default=64, ge=1)
    seq_len: int = Field(default=128, ge=8, le=131072)


class PublicTextConfig(Section):
    """Text the coordinator may use: public, never a site's records. `data`: a CSV, JSONL or
    .txt folder (as a site's data section); unset: clinical-style notes the project generates."""

    data: DataConfig | None = None
    generated_records: int = Field(default=600, ge=20)
    seed: int = 0


class ReleaseConfig(Section):
    """After the last round: distill (unless `distill` is null), export, and write a model card."""

    public_text: PublicTextConfig = PublicTextConfig()
    distill: DistillConfig | None = DistillConfig()
    export: ExportConfig = ExportConfig()
