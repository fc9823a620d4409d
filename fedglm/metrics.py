"""The run folder's `metrics.jsonl`: one JSON object per finished round (a contract).

Keys (never removed or renamed): round, train_loss, val_loss, upload_bytes, download_bytes,
dense_upload_bytes, clients, epsilon_max, seconds; since compression also val_bpb,
dense_download_bytes, rejected_updates and rejections (reason code -> count); with
`federation.public_eval`, public_val_loss and public_val_bpb (the coordinator's own score of the
round's model on public held-out text, `server/public_eval.py`). Bytes are the
serialized content of the messages as Flower sends them (every object of the message's record
tree), without gRPC/TLS framing: `upload_bytes` over all clients' replies, `download_bytes`
over all messages sent, `dense_*` what the same messages would weigh with the model as dense
fp32 tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedglm.atomic import append_json_line, atomic_write_text
from fedglm.layout import METRICS_NAME

REQUIRED_KEYS = (
    "round",
    "train_loss",
    "val_loss",
    "upload_bytes",
    "download_bytes",
    "dense_upload_bytes",
    "clients",
    "epsilon_max",
    "seconds",
)


def append_round(out_dir: Path, row: dict[str, Any]) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in row]
    assert not missing, f"metrics row lacks {missing}"
    append_json_line(out_dir / METRICS_NAME, row)


def read_rows(out_dir: Path) -> list[dict[str, Any]]:
    """Complete rows of `metrics.jsonl` (a torn last line from a crash is skipped)."""
    path = out_dir / METRICS_NAME
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "round" in row:
            rows.append(row)
    return rows


def truncate_after(out_dir: Path, last_round: int) -> None:
    """Keep only rows up to `last_round` (the checkpoint's), before a resumed run appends."""
    rows = [r for r in read_rows(out_dir) if int(r["round"]) <= last_round]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write_text(out_dir / METRICS_NAME, text)
