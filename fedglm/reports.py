"""The release's reports, typed: what `release.py` writes and the model card and progress read.

`release/distill.json` (`DistillReport`) and `release/export.json` (`ExportReport`) are written
by the release steps and read back, validated, by the model card (`modelcard.py`) and the
command line (`cli/progress.py`); a report written by another fedglm version that does not
validate reads as absent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from fedglm.atomic import atomic_write_text
from fedglm.layout import DISTILL_REPORT, EXPORT_REPORT


class _Report(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ScoredModel(_Report):
    """A model's shape (`models.families.describe`) and its held-out scores on public text."""

    architecture: str
    parameters: int
    layers: int
    d_model: int
    heads: list[int]
    ffn_channels: list[int]
    max_seq_len: int
    vocab_size: int
    loss: float
    bits_per_byte: float
    tokens: int


class DistillReport(_Report):
    public_text: str
    held_out_records: int
    teacher: ScoredModel
    student: ScoredModel
    settings: dict[str, Any]
    final_loss: float
    seconds: float


class ExportedFile(_Report):
    """One exported file: ONNX variants carry parity and held-out scores, an engine its source."""

    file: str
    bytes: int
    max_abs_logit_diff: float | None = None
    next_token_agreement: float | None = None
    parity_tokens: int | None = None
    held_out_bits_per_byte: float | None = None
    built_from: str | None = None


class Parity(_Report):
    atol: float
    min_agreement: float
    passed: bool


class ExportReport(_Report):
    model: str
    parameters: int
    torch_held_out_bits_per_byte: float
    files: dict[str, ExportedFile]
    parity: Parity


ReportT = TypeVar("ReportT", bound=_Report)


def write_report(release_dir: Path, report: DistillReport | ExportReport) -> Path:
    """Write `report` into a run's `release/` folder (atomically); its path."""
    path = release_dir / (DISTILL_REPORT if isinstance(report, DistillReport) else EXPORT_REPORT)
    atomic_write_text(path, report.model_dump_json(indent=2, exclude_none=True) + "\n")
    return path


def read_report(release_dir: Path, cls: type[ReportT]) -> ReportT | None:
    """The release folder's report of kind `cls`; None if there is none (or it does not validate)."""
    path = release_dir / (DISTILL_REPORT if cls is DistillReport else EXPORT_REPORT)
    try:
        return cls.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValidationError):
        return None
