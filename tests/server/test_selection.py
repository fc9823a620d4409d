"""Which round's model a run releases, and when it stops (`federation.selection`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedglm import metrics
from fedglm.config import FederationConfig, SelectionConfig
from fedglm.layout import BEST_CHECKPOINT
from fedglm.server.checkpoint import Checkpoint, save_checkpoint
from fedglm.server.selection import Best, best_round, clear, released_checkpoint, select


def _row(server_round: int, **values: float | None) -> dict[str, object]:
    return {key: 0 for key in metrics.REQUIRED_KEYS} | {"val_loss": None, "round": server_round, **values}


def _finish(out: Path, server_round: int, cfg: SelectionConfig, **values: float | None) -> bool:
    """What the ServerApp does at the end of a round: checkpoint, row, then selection."""
    state = {"w": torch.full((2,), float(server_round))}
    save_checkpoint(
        out, Checkpoint(round=server_round, state=state, residual={}, run_key="k", fingerprint="f")
    )
    metrics.append_round(out, _row(server_round, **values))
    return select(out, cfg, server_round)


def test_the_best_round_must_beat_the_best_so_far_by_min_delta() -> None:
    rows = [_row(0, public_val_loss=3.0), _row(1, public_val_loss=2.0), _row(2, public_val_loss=1.95)]
    assert best_round(rows, SelectionConfig()) == Best(2, 1.95)
    assert best_round(rows, SelectionConfig(min_delta=0.1)) == Best(1, 2.0)
    # a round without the metric (sites keep their losses) or with NaN is never the best
    rows = [_row(0, val_loss=None), _row(1, val_loss=float("nan")), _row(2)]
    assert best_round(rows, SelectionConfig(metric="val_loss")) is None


def test_the_release_takes_the_best_round_and_patience_ends_the_run(tmp_path: Path) -> None:
    cfg = SelectionConfig(patience=2)
    assert not _finish(tmp_path, 0, cfg, public_val_loss=3.0)
    assert not _finish(tmp_path, 1, cfg, public_val_loss=2.0)
    assert not _finish(tmp_path, 2, cfg, public_val_loss=2.5)  # worse: the release keeps round 1
    released = released_checkpoint(tmp_path)
    assert released is not None and released.round == 1 and torch.equal(released.state["w"], torch.ones(2))
    assert _finish(tmp_path, 3, cfg, public_val_loss=2.1)  # two rounds without a better one: stop
    released = released_checkpoint(tmp_path)
    assert released is not None and released.round == 1


def test_without_selection_or_a_best_copy_the_last_round_is_released(tmp_path: Path) -> None:
    cfg = SelectionConfig(metric="val_loss", patience=1)
    for server_round in range(3):  # the sites never share their losses: nothing to select by
        assert not _finish(tmp_path, server_round, cfg, val_loss=None)
    assert not (tmp_path / BEST_CHECKPOINT).exists()
    released = released_checkpoint(tmp_path)
    assert released is not None and released.round == 2
    _finish(tmp_path, 3, cfg, val_loss=1.0)
    assert (tmp_path / BEST_CHECKPOINT).exists()
    clear(tmp_path)  # a fresh run drops an earlier run's best model
    released = released_checkpoint(tmp_path)
    assert released is not None and released.round == 3


def test_selecting_by_public_loss_needs_public_text() -> None:
    with pytest.raises(ValueError, match="public_val_loss needs a public_eval section"):
        FederationConfig.model_validate({"selection": {"patience": 2}})
    FederationConfig.model_validate({"selection": {"metric": "val_loss"}})
    FederationConfig.model_validate({"selection": {}, "public_eval": {}})


def test_selecting_by_the_sites_loss_under_dp_needs_it_asked_for() -> None:
    FederationConfig.model_validate({"selection": {"metric": "dp_val_loss"}})  # asked for by default
    with pytest.raises(ValueError, match="dp_val_loss needs site_metrics"):
        FederationConfig.model_validate({"selection": {"metric": "dp_val_loss"}, "site_metrics": None})
    cfg = SelectionConfig(metric="dp_val_loss", min_delta=0.05)
    assert best_round([{"round": 0, "dp_val_loss": 6.0}, {"round": 1, "dp_val_loss": 5.97}], cfg) == Best(
        0, 6.0
    )
