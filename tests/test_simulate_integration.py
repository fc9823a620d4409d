"""`fedglm simulate` end to end: a real SuperLink and two real SuperNodes, TLS, loopback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedglm.cli.main import app
from fedglm.metrics import REQUIRED_KEYS

pytestmark = pytest.mark.integration


def test_simulate_two_sites_two_rounds(tmp_path: Path) -> None:
    config = tmp_path / "sim.yaml"
    config.write_text(
        "federation:\n  rounds: 2\n  min_clients: 2\n"
        "  train:\n    local_steps: 15\n    batch_size: 8\n    seq_len: 64\n"
        "generated:\n  sites: 2\n  records_per_site: 40\n"
    )
    out = tmp_path / "run"

    result = CliRunner().invoke(app, ["simulate", "--config", str(config), "--out", str(out)])

    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert set(REQUIRED_KEYS) <= set(row)
        assert row["clients"] == 2
        assert row["epsilon_max"] is None and row["rejected_updates"] == 0
        # topk by default: compressed uploads, and compressed downloads after round 1's seed
        assert 0 < row["upload_bytes"] * 5 < row["dense_upload_bytes"]
        assert 0 < row["download_bytes"] * 3 < row["dense_download_bytes"]
    assert rows[1]["val_loss"] < rows[0]["val_loss"]
    assert "round 2/2" in result.output
    assert "fewer than dense" in result.output
    # Each site kept its copy of the global model and its residual between messages.
    for site in ("site-1", "site-2"):
        state = out / "sites" / site / "state"
        assert (state / "global-model.pt").is_file() and (state / "residual.pt").is_file()
    # Nothing is left running: every Flower process of the run is gone.
    assert not _processes_mentioning(str(out))


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline or text in environ:
            found.append(int(proc.name))
    return found
