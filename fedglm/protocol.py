"""The round protocol: what the coordinator tells a site each round, as one typed record.

`RoundConfig` has one writer (`to_record`: the coordinator's strategy builds one per round)
and one reader (`from_record`: the site's ClientApp, once per message, validating every key).
On the wire it is one flat ConfigRecord under `config`, since Flower records do not nest:

| key                  | field          | notes                                                    |
|----------------------|----------------|----------------------------------------------------------|
| `model.*`, `train.*` | `model`, `train` | null values left out, restored from the config defaults |
| `seed`               | `seed`         | the federation's seed                                    |
| `server-round`       | `server_round` | written by Flower itself in its stock strategies         |
| `rounds`             | `rounds`       | the run's rounds (a site spreads its budget over them)   |
| `run-key`            | `run_key`      | names the run; absent from stock messages                |
| `uplink.*`           | `uplink`       | the round's uplink codec, density, selection             |
| `prune.mask`         | `mask`         | the pruning mask as JSON; absent while unpruned          |
| `base.hash`          | `base_hash`    | the announced base model's hash (64 hex digits)          |
| `metrics.centre`, `metrics.radius` | `metrics_window` | (loss, bpb) window of the DP metric release |

The coordinator's receipts for a site's ledger travel per node in their own record
(`receipt`, `{"lines": [...]}`), written and read here too. Flower's stock strategies (the
benchmarks' baseline) carry only `model.*`, `train.*`, `seed` and `server-round`: `run_key`
and `uplink` are then None, and a site answers with dense weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, RecordDict

from fedglm.config import LinkConfig, ModelConfig, TrainConfig, validate_config
from fedglm.payload import CONFIG_KEY, RECEIPT_KEY, PayloadError
from fedglm.privacy.metric_release import Window

MASK_KEY = "prune.mask"
CENTRE_KEY = "metrics.centre"
RADIUS_KEY = "metrics.radius"
BASE_HASH_KEY = "base.hash"
NULLABLE_TRAIN_KEYS = ("local_steps", "local_epochs", "grad_clip")
# Ledger lines a reply carries (the site's lines not yet receipted) and receipts a message
# carries back: one bound for both directions.
MAX_CATCH_UP = 64
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SOURCE = "round config from the coordinator"


@dataclass(frozen=True)
class RoundConfig:
    """One round's settings, as the coordinator sends them to every site it asks."""

    model: ModelConfig
    train: TrainConfig
    seed: int
    server_round: int | None = None
    rounds: int | None = None
    run_key: str | None = None
    uplink: LinkConfig | None = None
    mask: str = ""
    base_hash: str | None = None
    metrics_window: Window | None = None

    def to_record(self) -> ConfigRecord:
        flat: dict[str, Any] = {"seed": self.seed}
        for prefix, section in (("model", self.model.model_dump()), ("train", self.train.model_dump())):
            for key, value in section.items():
                flat[f"{prefix}.{key}"] = value
        if self.base_hash is not None:
            flat[BASE_HASH_KEY] = self.base_hash
        flat["rounds"] = self.rounds
        flat["server-round"] = self.server_round
        flat["run-key"] = self.run_key
        if self.uplink is not None:
            for key, value in self.uplink.model_dump().items():
                flat[f"uplink.{key}"] = value
        if self.mask:
            flat[MASK_KEY] = self.mask
        if self.metrics_window is not None:
            flat[CENTRE_KEY] = list(self.metrics_window.centre)
            flat[RADIUS_KEY] = list(self.metrics_window.radius)
        return ConfigRecord({k: v for k, v in flat.items() if v is not None})

    @classmethod
    def from_record(cls, record: ConfigRecord | None) -> RoundConfig:
        """Read and validate a round's config (`PayloadError` / `InputError` naming the bad key)."""
        if record is None:
            raise PayloadError(f"no '{CONFIG_KEY}' ConfigRecord in the message")
        sections: dict[str, dict[str, Any]] = {"model": {}, "train": {}, "uplink": {}}
        for key, value in record.items():
            prefix, _, name = key.partition(".")
            if prefix in sections and name:
                sections[prefix][name] = value
        for name in NULLABLE_TRAIN_KEYS:
            sections["train"].setdefault(name, None)
        uplink = sections["uplink"]
        return cls(
            model=validate_config(sections["model"], ModelConfig, source=_SOURCE),
            train=validate_config(sections["train"], TrainConfig, source=_SOURCE),
            seed=_integer(record, "seed", 0),
            server_round=_integer(record, "server-round", 0),
            rounds=_integer(record, "rounds", 1),
            run_key=_text(record, "run-key"),
            uplink=validate_config(uplink, LinkConfig, source=_SOURCE) if uplink else None,
            mask=_text(record, MASK_KEY, reason="bad-mask") or "",
            base_hash=_base_hash(record),
            metrics_window=_metrics_window(record),
        )


def _integer(record: ConfigRecord, key: str, default: int) -> int:
    value = record.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(f"config '{key}' is {value!r}, expected an integer")
    return value


def _text(record: ConfigRecord, key: str, *, reason: str = "bad-record") -> str | None:
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise PayloadError(f"config '{key}' is {type(value).__name__}, expected a string", reason)
    return value


def _base_hash(record: ConfigRecord) -> str | None:
    value = record.get(BASE_HASH_KEY)
    if value is not None and not (isinstance(value, str) and _HEX64.fullmatch(value)):
        raise PayloadError(f"config '{BASE_HASH_KEY}' is {value!r}, expected 64 hex digits", "wrong-base")
    return value


def _metrics_window(record: ConfigRecord) -> Window | None:
    centre, radius = record.get(CENTRE_KEY), record.get(RADIUS_KEY)
    if centre is None and radius is None:
        return None
    pairs = (centre, radius)
    if not all(isinstance(p, list) and len(p) == 2 and all(_is_number(x) for x in p) for p in pairs):
        raise PayloadError(f"config '{CENTRE_KEY}' and '{RADIUS_KEY}' must be lists of two numbers")
    assert isinstance(centre, list) and isinstance(radius, list)
    window = Window((float(centre[0]), float(centre[1])), (float(radius[0]), float(radius[1])))
    problem = window.problem()
    if problem is not None:
        raise PayloadError(f"config '{CENTRE_KEY}' / '{RADIUS_KEY}': {problem}")
    return window


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def receipts_record(lines: list[str]) -> ConfigRecord:
    return ConfigRecord({"lines": lines})


def read_receipts(content: RecordDict) -> list[str]:
    """The receipt lines a message carries (at most `MAX_CATCH_UP` strings; others ignored)."""
    record = content.config_records.get(RECEIPT_KEY)
    lines = record.get("lines") if record is not None else None
    if not isinstance(lines, list):
        return []
    return [line for line in lines[:MAX_CATCH_UP] if isinstance(line, str)]
