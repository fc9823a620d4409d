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


@pytest.fixture(autouse=True)
def replayable_dp_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests assert that a loss falls under DP noise: seed the noise (tests only, see
    `privacy/dpsgd.py`) so that a failure can be replayed."""
    monkeypatch.setenv("FEDGLM_TEST_DP_SEED", "20261130")


def test_simulate_two_sites_two_rounds(tmp_path: Path, tiny_base: Path) -> None:
    config = tmp_path / "sim.yaml"
    config.write_text(
        f"federation:\n  base: {tiny_base}\n  rounds: 2\n  min_clients: 2\n"
        "  train:\n    local_steps: 15\n    batch_size: 8\n    seq_len: 64\n"
        "generated:\n  sites: 2\n  records_per_site: 40\npretrain: null\n"
    )
    out = tmp_path / "run"

    result = CliRunner().invoke(app, ["simulate", "--config", str(config), "--out", str(out)])

    assert result.exit_code == 0, result.output
    all_rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in all_rows] == [0, 1, 2]
    base_row, rows = all_rows[0], all_rows[1:]
    # round 0: the base evaluated at both sites, nothing trained; only the metrics released
    # under DP spent anything (one Gaussian mechanism at z = 5 each)
    assert base_row["train_loss"] is None and base_row["clients"] == 0
    assert base_row["epsilon"] == pytest.approx({"site-1": 0.7263, "site-2": 0.7263}, abs=1e-3)
    assert base_row["val_loss"] > rows[0]["val_loss"]
    assert base_row["download_bytes"] * 20 < base_row["dense_download_bytes"]  # sites build it themselves
    for row in all_rows:  # the sites' losses released under DP, pooled, within the first window
        assert row["dp_sites"] == 2 and 0 <= row["dp_val_loss"] <= 16 and row["dp_val_noise"] > 0
    for row in rows:
        assert set(REQUIRED_KEYS) <= set(row)
        assert row["clients"] == 2
        assert row["rejected_updates"] == 0 and row["declined"] == 0
        # DP-SGD at both sites (default budget 8, spread over the run's rounds)
        assert 0 < row["epsilon_max"] <= 8.0 and set(row["epsilon"]) == {"site-1", "site-2"}
        # topk by default: compressed uploads, and compressed downloads (each site holds the base)
        assert 0 < row["upload_bytes"] * 5 < row["dense_upload_bytes"]
        assert 0 < row["download_bytes"] * 3 < row["dense_download_bytes"]
    assert rows[1]["val_loss"] < rows[0]["val_loss"]
    assert rows[1]["epsilon_max"] > rows[0]["epsilon_max"]
    assert "round 2/2" in result.output
    assert "privacy (unit: one record" in result.output
    # each site's ledger verifies, with the coordinator's receipts, and spent within its budget
    for site in ("site-1", "site-2"):
        state = out / "sites" / site / "state"
        audit = CliRunner().invoke(
            app,
            [
                "audit",
                str(state / "privacy" / "ledger.jsonl"),
                "--public-key",
                str(state / "ledger.pub"),
                "--server-key",
                str(out / "receipt.pub"),
                "--receipts",
                str(out / "receipts" / f"{site}.jsonl"),
                "--json",
            ],
        )
        assert audit.exit_code == 0, audit.output
        report = json.loads(audit.stdout)
        assert [r["receipt"] for r in report["rows"]] == ["ok"] * 5
        assert [r["release"] for r in report["rows"]] == ["metrics", "update", "metrics", "update", "metrics"]
        assert report["rows"][-1]["claimed"] == rows[1]["epsilon"][site]
    # the release: teacher and student folders, exported files with passing parity, and a card
    # stating each site's epsilon
    release = out / "release"
    assert {"teacher", "model", "model.onnx", "model.kv.onnx", "model.int8.onnx", "model.fp16.onnx"} <= {
        p.name for p in release.iterdir()
    }
    assert (release / "MODEL_CARD.md").is_file() and (release / "model" / "config.json").is_file()
    card = json.loads((release / "model_card.json").read_text())
    assert card["export"]["parity"]["passed"] is True
    assert {s["client"]: s["epsilon"] for s in card["privacy"]["sites"]} == rows[1]["epsilon"]
    assert "model.int8.onnx" in result.output


def _run(tmp_path: Path, base: Path, name: str, pruning: str) -> list[dict[str, object]]:
    """The rounds' rows (round 0, the base's evaluation, left out)."""
    config = tmp_path / f"{name}.yaml"
    config.write_text(
        f"federation:\n  base: {base}\n  rounds: 3\n  min_clients: 2\n"
        "  train:\n    local_steps: 5\n    batch_size: 8\n    seq_len: 64\n"
        + pruning
        + "generated:\n  sites: 2\n  records_per_site: 40\nrelease: null\npretrain: null\n"
    )
    out = tmp_path / name
    result = CliRunner().invoke(app, ["simulate", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["round"] == 0
    return rows[1:]


def test_a_pruned_run_sends_fewer_bytes_than_an_unpruned_one(tmp_path: Path, tiny_base: Path) -> None:
    plain = _run(tmp_path, tiny_base, "plain", "")
    pruned = _run(
        tmp_path, tiny_base, "pruned", "  pruning:\n    schedule: [{round: 2, heads: 0.5, channels: 0.5}]\n"
    )
    assert [r["clients"] for r in pruned] == [2, 2, 2]
    after = sum(int(r["upload_bytes"]) for r in pruned[1:])  # type: ignore[call-overload]
    before = sum(int(r["upload_bytes"]) for r in plain[1:])  # type: ignore[call-overload]
    assert after < 0.85 * before, (after, before)
    assert pruned[2]["val_loss"] < pruned[0]["val_loss"]  # type: ignore[operator]


def test_sites_decline_when_their_budget_is_spent_and_the_run_ends(tmp_path: Path, tiny_base: Path) -> None:
    """Budgets planned for 1 round in a 3-round run: round 2 is declined and the run stops."""
    config = tmp_path / "sim.yaml"
    config.write_text(
        f"federation:\n  base: {tiny_base}\n  rounds: 3\n  min_clients: 2\n"
        "  train:\n    local_steps: 5\n    batch_size: 8\n    seq_len: 64\n"
        "generated:\n  sites: 2\n  records_per_site: 40\npretrain: null\n"
        "privacy:\n  epsilon: 2.0\n  rounds: 1\n"
    )
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["simulate", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert (out / "DONE").read_text() == "1\n"
    assert 1.9 < rows[1]["epsilon_max"] <= 2.0
    for site in ("site-1", "site-2"):
        ledger = out / "sites" / site / "state" / "privacy" / "ledger.jsonl"
        entries = [json.loads(line)["entry"] for line in ledger.read_text().splitlines()]
        # round 1 only: the declined round spent nothing, and the run's two metric releases alone
        # (epsilon 1.07 at z = 5) would take over half of epsilon 2, so none was made
        assert [(e["release"], e["round"]) for e in entries] == [("update", 1)]
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


def test_lora_from_a_pretrained_base_sends_only_adapters(tmp_path: Path) -> None:
    config = tmp_path / "lora.yaml"
    config.write_text(
        "federation:\n  rounds: 2\n  min_clients: 2\n"
        "  train:\n    local_steps: 5\n    batch_size: 8\n    seq_len: 64\n    lr: 0.002\n"
        "    adapters: lora\n    lora_rank: 4\n"
        "generated:\n  sites: 2\n  records_per_site: 40\n"
        "pretrain:\n  steps: 40\n  batch_size: 8\n  seq_len: 64\n"
        "release:\n  distill: {steps: 10}\n  export: {fp16: false}\n"
    )
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["simulate", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["clients"] for r in rows] == [0, 2, 2] and rows[-1]["rejected_updates"] == 0
    # Uploads carry the trained B matrices only (a few % of the weights), compressed.
    for row in rows[1:]:
        assert 0 < row["upload_bytes"] * 50 < row["dense_upload_bytes"]
    # The base never goes down (each site builds it from its folder): changes of B only.
    for row in rows:
        assert row["download_bytes"] * 20 < row["dense_download_bytes"]
    manifest = json.loads((out / "base" / "model" / "fedglm-base.json").read_text())
    assert json.loads((out / "base.json").read_text()) == manifest  # the run folder's copy
    card = json.loads((out / "release" / "model_card.json").read_text())
    assert card["base_model"]["hash"] == manifest["folder_hash"]
    assert card["base_model"]["public_data_only"] is True
    assert card["fine_tuning"]["method"].startswith("lora") and card["fine_tuning"]["rank"] == 4
    assert card["export"]["parity"]["passed"] is True  # the merged model exports and matches
    assert "## Base model" in (out / "release" / "MODEL_CARD.md").read_text()
