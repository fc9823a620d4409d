"""What every config section shares: frozen sections without unknown keys, paths resolved against
the config file's folder, and the small types several sections use (site names, hashes, ports)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PortNumber = Annotated[int, Field(ge=1, le=65535)]


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    value = value.expanduser()
    if base is not None and not value.is_absolute():
        value = Path(base) / value
    return value.absolute()


ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


BaseHash = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="64 lower-case hex digits (SHA-256)")]

_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def is_site_name(value: str) -> bool:
    return bool(_SITE_NAME.fullmatch(value))


def _check_site_name(value: str) -> str:
    if not is_site_name(value):
        raise ValueError("use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


SiteName = Annotated[str, AfterValidator(_check_site_name)]
