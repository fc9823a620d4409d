"""What `fedglm server` and `simulate` print about a run's rounds."""

from __future__ import annotations

from pathlib import Path

from fedglm.cli.progress import round_line, table_title


def test_the_title_counts_trained_rounds_not_the_base_row() -> None:
    rows = [{"round": 0, "val_loss": 6.8}, {"round": 1, "val_loss": 6.4}, {"round": 2, "val_loss": 5.9}]
    title = table_title("fedglm simulate", rows, Path("runs/m.jsonl"))
    assert title == "fedglm simulate: 2 rounds after round 0 (the base), metrics in runs/m.jsonl"
    assert (
        table_title("fedglm server", rows[1:], Path("m.jsonl"))
        == "fedglm server: 2 rounds, metrics in m.jsonl"
    )


def test_a_round_line_shows_the_round_and_its_losses() -> None:
    line = round_line({"round": 0, "val_loss": 6.8242, "val_bpb": 4.1761, "clients": 0}, total_rounds=3)
    assert line.startswith("round 0/3") and "val_loss 6.8242" in line and "train_loss -" in line


def test_the_coordinators_public_score_is_shown_when_the_run_has_one() -> None:
    row = {"round": 2, "val_loss": None, "public_val_loss": 0.4567, "clients": 3}
    assert "val_loss -  val_bpb -  public_val_loss 0.4567  up" in round_line(row, total_rounds=3)
    assert "public_val_loss" not in round_line({"round": 2, "clients": 3}, total_rounds=3)
