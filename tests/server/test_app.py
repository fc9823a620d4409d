"""The ServerApp's start of a run (`fedglm/server/app.py`): reading its spec, a fresh run's round-0
checkpoint, and the decisions of a resumed run. A fake Grid stands in for Flower's: no SuperLink,
no SuperNode, no round is trained."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
from flwr.app import Context
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedglm import metrics
from fedglm.config import FederationConfig, RunSpec
from fedglm.errors import InputError
from fedglm.layout import METRICS_NAME, SPEC_KEY
from fedglm.model import build_model
from fedglm.privacy.keys import make_keys
from fedglm.server.app import read_spec, run_federation
from fedglm.server.checkpoint import Checkpoint, load_checkpoint, model_fingerprint, save_checkpoint

TINY = {"preset": "tiny", "d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "max_seq_len": 32}


class GridGone(Exception):
    """What the fake Grid raises where the real one would wait for or talk to nodes."""


class FakeGrid:
    """The Grid as the ServerApp uses it. `node_ids` is what each `get_node_ids` call answers
    (the last answer repeats); every call is recorded; pushing raises `GridGone`."""

    def __init__(self, *node_ids: list[int], fail: bool = False) -> None:
        self.node_ids = list(node_ids)
        self.fail = fail
        self.calls: list[str] = []
        self.pushed: list[Any] = []

    def get_node_ids(self) -> list[int]:
        self.calls.append("get_node_ids")
        if self.fail:
            raise GridGone("the SuperLink went away")
        return self.node_ids.pop(0) if len(self.node_ids) > 1 else self.node_ids[0]

    def push_messages(self, messages: Any) -> list[str]:
        self.calls.append("push_messages")
        self.pushed.extend(messages)
        raise GridGone("pushed")

    def pull_messages(self, ids: Any) -> list[Any]:
        self.calls.append("pull_messages")
        raise GridGone("pulled")


class UntouchedGrid:
    """A Grid that must not be used at all."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the Grid was used: {name}")


def _spec(out: Path, *, resume: bool, rounds: int = 2, min_clients: int = 2) -> RunSpec:
    if not (out / "receipt.key").exists():
        make_keys(out, "receipt")
    federation = FederationConfig.model_validate(
        {
            "rounds": rounds,
            "min_clients": min_clients,
            "model": TINY,
            "train": {"local_steps": 1, "batch_size": 2, "seq_len": 16},
        }
    )
    return RunSpec(federation=federation, out_dir=out, resume=resume, receipt_key=out / "receipt.key")


def _run(grid: object, spec: RunSpec) -> None:
    run_federation(cast(Grid, grid), spec)


# --- read_spec ----------------------------------------------------------------------------------


def test_read_spec_reads_the_spec_the_run_config_names(tmp_path: Path) -> None:
    spec = _spec(tmp_path, resume=False)
    path = tmp_path / "run-spec.json"
    path.write_text(spec.model_dump_json(), encoding="utf-8")
    context = cast(Context, SimpleNamespace(run_config={SPEC_KEY: str(path)}))
    assert read_spec(context) == spec


def test_a_run_not_started_by_fedglm_is_refused_in_one_line() -> None:
    for run_config in ({}, {SPEC_KEY: 3}):
        context = cast(Context, SimpleNamespace(run_config=run_config))
        with pytest.raises(
            InputError, match=f"run config has no '{SPEC_KEY}': start runs with `fedglm server`"
        ):
            read_spec(context)


# --- a fresh run --------------------------------------------------------------------------------


def test_a_fresh_run_checkpoints_round_0_before_round_1_begins(tmp_path: Path) -> None:
    spec = _spec(tmp_path, resume=False)
    grid = FakeGrid(fail=True)  # round 1 breaks off at once
    with pytest.raises(GridGone):
        _run(grid, spec)

    assert grid.calls == ["get_node_ids"]
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.round == 0
    assert len(checkpoint.run_key) == 16 and int(checkpoint.run_key, 16) >= 0
    fed = spec.federation
    assert checkpoint.fingerprint == model_fingerprint(fed.model.model_dump(), base=None, lora=None)
    seeded = build_model(fed.model.glm_args(), fed.model.init_seed).state_dict()
    assert checkpoint.state.keys() == seeded.keys()
    assert all(torch.equal(checkpoint.state[name], seeded[name].float()) for name in seeded)
    assert all(not t.any() for t in checkpoint.residual.values())
    assert not (tmp_path / "DONE").exists()


def test_a_fresh_run_draws_a_new_run_key_and_clears_old_metrics(tmp_path: Path) -> None:
    spec = _spec(tmp_path, resume=False)
    metrics.append_round(tmp_path, {k: 0 for k in metrics.REQUIRED_KEYS} | {"round": 1})
    keys = set()
    for _ in range(2):
        with pytest.raises(GridGone):
            _run(FakeGrid(fail=True), spec)
        checkpoint = load_checkpoint(tmp_path)
        assert checkpoint is not None and checkpoint.round == 0
        keys.add(checkpoint.run_key)
    assert len(keys) == 2  # resume: false starts another run, whose clients keep other state
    assert metrics.read_rows(tmp_path) == []


def test_a_run_ends_after_round_0_when_too_few_sites_remain(tmp_path: Path) -> None:
    """Two sites connect, one is gone when round 1 samples: no round is trained, the run ends."""
    spec = _spec(tmp_path, resume=False, min_clients=2)
    grid = FakeGrid([1, 2], [1])
    _run(grid, spec)

    assert "push_messages" not in grid.calls and grid.pushed == []
    assert (tmp_path / "DONE").read_text() == "0\n"
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.round == 0
    assert metrics.read_rows(tmp_path) == []


# --- a resumed run ------------------------------------------------------------------------------


@pytest.fixture
def serverapp_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """The identity `flwr-serverapp` gives its process: Flower's Message needs it to be built."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.mark.usefixtures("serverapp_task")
def test_a_resumed_run_keeps_the_run_key_of_its_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(GridGone):
        _run(FakeGrid(fail=True), _spec(tmp_path, resume=False))
    first = load_checkpoint(tmp_path)
    assert first is not None

    grid = FakeGrid([5, 6])
    with pytest.raises(GridGone, match="pushed"):
        _run(grid, _spec(tmp_path, resume=True))

    assert {m.metadata.dst_node_id for m in grid.pushed} == {5, 6}
    for message in grid.pushed:
        config = message.content.config_records["config"]
        assert config["run-key"] == first.run_key
        assert config["server-round"] == 1  # round 0 was done: the run goes on with round 1
    again = load_checkpoint(tmp_path)
    assert again is not None and again.run_key == first.run_key and again.round == 0


def test_a_finished_run_is_not_run_again(tmp_path: Path) -> None:
    spec = _spec(tmp_path, resume=True, rounds=2)
    fed = spec.federation
    state = build_model(fed.model.glm_args(), fed.model.init_seed).state_dict()
    fingerprint = model_fingerprint(fed.model.model_dump())
    save_checkpoint(tmp_path, Checkpoint(2, dict(state), {}, "abcd", fingerprint))
    for server_round in (1, 2, 3):  # a row past the checkpoint (written after it, before a crash)
        metrics.append_round(tmp_path, {k: 0 for k in metrics.REQUIRED_KEYS} | {"round": server_round})

    _run(UntouchedGrid(), spec)

    assert [r["round"] for r in metrics.read_rows(tmp_path)] == [1, 2]
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint is not None and (checkpoint.round, checkpoint.run_key) == (2, "abcd")


def test_resuming_with_another_model_is_refused(tmp_path: Path) -> None:
    spec = _spec(tmp_path, resume=True)
    other = spec.federation.model.model_copy(update={"d_model": 64, "n_heads": 4})
    fingerprint = model_fingerprint(other.model_dump())
    save_checkpoint(tmp_path, Checkpoint(1, {}, {}, "abcd", fingerprint))
    metrics.append_round(tmp_path, {k: 0 for k in metrics.REQUIRED_KEYS} | {"round": 1})

    with pytest.raises(InputError, match=r"its checkpoint is of another model shape.*use a new out_dir"):
        _run(UntouchedGrid(), spec)
    assert len(metrics.read_rows(tmp_path)) == 1  # nothing touched
    assert json.loads((tmp_path / METRICS_NAME).read_text())["round"] == 1
