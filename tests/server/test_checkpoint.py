from pathlib import Path

import pytest
import torch

from fedglm import metrics
from fedglm.errors import InputError
from fedglm.layout import CHECKPOINT_NAME, METRICS_NAME
from fedglm.server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint


def test_checkpoint_round_trip_and_no_leftover_temp_files(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path) is None
    save_checkpoint(
        tmp_path,
        Checkpoint(
            round=3,
            state={"w": torch.ones(2)},
            residual={"w": torch.zeros(2)},
            run_key="k",
            fingerprint="abc",
        ),
    )
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.round == 3 and torch.equal(loaded.state["w"], torch.ones(2))
    assert loaded.run_key == "k" and torch.equal(loaded.residual["w"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]


def test_failed_write_keeps_previous_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(
        tmp_path, Checkpoint(round=1, state={"w": torch.ones(1)}, residual={}, run_key="k", fingerprint="a")
    )

    class Unsaveable:
        def __reduce__(self) -> tuple[object, ...]:
            raise RuntimeError("disk full")

    # deliberately not a tensor: torch.save fails part-way through the write
    unsaveable: dict[str, torch.Tensor] = {"w": Unsaveable()}  # type: ignore[dict-item]
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(
            tmp_path,
            Checkpoint(round=2, state=unsaveable, residual={}, run_key="k", fingerprint="a"),
        )
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.round == 1
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="unreadable checkpoint"):
        load_checkpoint(tmp_path)


def test_metrics_skip_torn_line_and_truncate_for_resume(tmp_path: Path) -> None:
    row = {k: 0 for k in metrics.REQUIRED_KEYS}
    for r in (1, 2, 3):
        metrics.append_round(tmp_path, {**row, "round": r})
    with (tmp_path / METRICS_NAME).open("a") as handle:
        handle.write('{"round": 4, "trai')
    assert [r["round"] for r in metrics.read_rows(tmp_path)] == [1, 2, 3]
    metrics.truncate_after(tmp_path, 2)
    assert [r["round"] for r in metrics.read_rows(tmp_path)] == [1, 2]
