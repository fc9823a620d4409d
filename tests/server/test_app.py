"""The ServerApp's start of a run (`fedglm/server/app.py`): reading its spec, the base model folder,
a fresh run's round-0 checkpoint and evaluation of the base, and the decisions of a resumed run. A
fake Grid stands in for Flower's: no SuperLink, no SuperNode, no round is trained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
from flwr.app import Context, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedglm import metrics
from fedglm.compression import Kind, model_hash
from fedglm.compression.wire import unpack
from fedglm.config import FederationConfig, RunSpec
from fedglm.data import text_bytes
from fedglm.errors import InputError
from fedglm.layout import (
    BASE_MANIFEST,
    BEST_CHECKPOINT,
    CHECKPOINT_NAME,
    DONE_NAME,
    MANIFEST_FILE,
    METRICS_NAME,
    SPEC_KEY,
)
from fedglm.models.base import BaseModel
from fedglm.models.lora import is_adapter, wire_state
from fedglm.models.tokenizer import encode_records
from fedglm.payload import expected_shapes, read_payload
from fedglm.pretrain import MANIFEST_FORMAT
from fedglm.privacy.keys import make_keys
from fedglm.public_text import public_text
from fedglm.server.app import read_spec, run_federation
from fedglm.server.checkpoint import Checkpoint, load_checkpoint, model_fingerprint, save_checkpoint
from fedglm.training import held_out


class GridGone(Exception):
    """What the fake Grid raises where the real one would wait for or talk to nodes."""


class FakeGrid:
    """The Grid as the ServerApp uses it. `node_ids` is what each `get_node_ids` call answers
    (the last answer repeats); every call is recorded. Pushing raises `GridGone`, except that
    with `evaluate=True` evaluation messages are answered at once, every node reporting
    `val_loss` 2.0 (and training messages still raise)."""

    def __init__(self, *node_ids: list[int], fail: bool = False, evaluate: bool = False) -> None:
        self.node_ids = list(node_ids)
        self.fail = fail
        self.evaluate = evaluate
        self.calls: list[str] = []
        self.pushed: list[Any] = []
        self.waiting: dict[str, Any] = {}

    def get_node_ids(self) -> list[int]:
        self.calls.append("get_node_ids")
        if self.fail:
            raise GridGone("the SuperLink went away")
        return self.node_ids.pop(0) if len(self.node_ids) > 1 else self.node_ids[0]

    def push_messages(self, messages: Any) -> list[str]:
        self.calls.append("push_messages")
        messages = list(messages)
        self.pushed.extend(messages)
        if not self.evaluate or any(m.metadata.message_type != MessageType.EVALUATE for m in messages):
            raise GridGone("pushed")
        ids = [f"m{len(self.pushed) + i}" for i in range(len(messages))]
        self.waiting.update(zip(ids, messages, strict=True))
        return ids

    def pull_messages(self, ids: Any) -> list[Any]:
        self.calls.append("pull_messages")
        if not self.evaluate:
            raise GridGone("pulled")
        return [EvalReply(self.waiting.pop(mid).metadata.dst_node_id, mid) for mid in list(ids)]


class EvalReply:
    """A node's evaluation reply, as the round loop and the strategy read it."""

    def __init__(self, node: int, reply_to: str) -> None:
        self.content = RecordDict({"metrics": MetricRecord({"val_loss": 2.0, "val_bpb": 1.5})})
        self.error = None
        self.metadata = SimpleNamespace(src_node_id=node, reply_to_message_id=reply_to)

    def has_error(self) -> bool:
        return False


class UntouchedGrid:
    """A Grid that must not be used at all."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the Grid was used: {name}")


def _spec(
    out: Path,
    base: Path | None,
    *,
    resume: bool,
    rounds: int = 2,
    min_clients: int = 2,
    train: dict[str, Any] | None = None,
    public_eval: dict[str, Any] | None = None,
    selection: dict[str, Any] | None = None,
) -> RunSpec:
    if not (out / "receipt.key").exists():
        make_keys(out, "receipt")
    federation = FederationConfig.model_validate(
        {
            "rounds": rounds,
            "min_clients": min_clients,
            "train": {"local_steps": 1, "batch_size": 2, "seq_len": 16, **(train or {})},
            "base": base,
            "public_eval": public_eval,
            "selection": selection,
        }
    )
    return RunSpec(federation=federation, out_dir=out, resume=resume, receipt_key=out / "receipt.key")


def _fingerprint(spec: RunSpec, base: BaseModel) -> str:
    fed = spec.federation
    lora = fed.train.lora_spec(fed.model.init_seed, base.family)
    return model_fingerprint(fed.model.model_dump(), base=base.hash, lora=lora)


def _row(server_round: int) -> dict[str, Any]:
    return {k: 0 for k in metrics.REQUIRED_KEYS} | {"round": server_round}


def _run(grid: object, spec: RunSpec) -> None:
    run_federation(cast(Grid, grid), spec)


@pytest.fixture
def serverapp_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """The identity `flwr-serverapp` gives its process: Flower's Message needs it to be built."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


# --- read_spec ----------------------------------------------------------------------------------


def test_read_spec_reads_the_spec_the_run_config_names(tmp_path: Path, tiny_base: Path) -> None:
    spec = _spec(tmp_path, tiny_base, resume=False)
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


# --- the base model -----------------------------------------------------------------------------


def test_a_run_without_a_base_or_with_adapters_the_base_lacks_is_refused_before_anything(
    tmp_path: Path, tiny_base: Path
) -> None:
    with pytest.raises(InputError, match=r"federation\.base is not set: name a base model folder"):
        _run(UntouchedGrid(), _spec(tmp_path, None, resume=False))
    with pytest.raises(InputError, match=f"model folder {tmp_path / 'nowhere'} does not exist"):
        _run(UntouchedGrid(), _spec(tmp_path, tmp_path / "nowhere", resume=False))
    glm4_lacks = {"adapters": "lora", "lora_targets": ["q_proj", "up_proj"]}
    with pytest.raises(
        InputError, match=r"train\.lora_targets: lora target 'up_proj' is not a projection of Glm4"
    ):
        _run(UntouchedGrid(), _spec(tmp_path, tiny_base, resume=False, train=glm4_lacks))
    with pytest.raises(
        InputError, match=r"train.seq_len \(512\) exceeds the 256 positions of the base model"
    ):
        _run(UntouchedGrid(), _spec(tmp_path, tiny_base, resume=False, train={"seq_len": 512}))
    assert load_checkpoint(tmp_path) is None and not (tmp_path / METRICS_NAME).exists()


def test_a_pretrained_base_leaves_its_manifest_in_the_run_folder(tmp_path: Path, tiny_base: Path) -> None:
    """The model card tells where the base came from: `fedglm pretrain` keeps its manifest inside
    the folder, and the run folder gets a copy (a checkpoint from elsewhere has none)."""
    folder = tmp_path / "base"
    shutil.copytree(tiny_base, folder)
    manifest = {"format": MANIFEST_FORMAT, "folder_hash": BaseModel.open(folder).hash, "steps": 3}
    (folder / BASE_MANIFEST).write_text(json.dumps(manifest))
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(GridGone):
        _run(FakeGrid(fail=True), _spec(out, folder, resume=False))
    assert json.loads((out / MANIFEST_FILE).read_text()) == manifest

    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(GridGone):
        _run(FakeGrid(fail=True), _spec(plain, tiny_base, resume=False))
    assert not (plain / MANIFEST_FILE).exists()


# --- a fresh run --------------------------------------------------------------------------------


def test_a_fresh_run_checkpoints_round_0_before_the_base_is_evaluated(
    tmp_path: Path, tiny_base: Path
) -> None:
    spec = _spec(tmp_path, tiny_base, resume=False)
    grid = FakeGrid(fail=True)  # the base's evaluation (round 0) breaks off at once
    with pytest.raises(GridGone):
        _run(grid, spec)

    assert grid.calls == ["get_node_ids"]
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.round == 0
    assert len(checkpoint.run_key) == 16 and int(checkpoint.run_key, 16) >= 0
    base = BaseModel.open(tiny_base)
    assert checkpoint.fingerprint == _fingerprint(spec, base)
    folder_weights = wire_state(base.build(lora=None))  # the global model starts as the base folder
    assert checkpoint.state.keys() == folder_weights.keys()
    assert all(torch.equal(checkpoint.state[name], folder_weights[name].float()) for name in folder_weights)
    assert all(not t.any() for t in checkpoint.residual.values())
    assert not (tmp_path / "DONE").exists()


def test_a_fresh_lora_run_starts_from_the_base_with_the_seeded_adapters(
    tmp_path: Path, tiny_base: Path
) -> None:
    spec = _spec(tmp_path, tiny_base, resume=False, train={"adapters": "lora", "lora_rank": 2})
    with pytest.raises(GridGone):
        _run(FakeGrid(fail=True), spec)
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint is not None
    base = BaseModel.open(tiny_base)
    lora = spec.federation.train.lora_spec(spec.federation.model.init_seed, base.family)
    assert lora is not None and lora.targets == base.family.projections  # unset targets: all of them
    assert checkpoint.fingerprint == _fingerprint(spec, base)
    built = wire_state(base.build(lora=lora))  # what every site builds itself from the same seed
    assert checkpoint.state.keys() == built.keys() and any(is_adapter(name) for name in built)
    assert all(torch.equal(checkpoint.state[name], built[name].float()) for name in built)


@pytest.mark.usefixtures("serverapp_task")
def test_a_fresh_run_first_evaluates_the_base_at_the_sites_as_round_0(
    tmp_path: Path, tiny_base: Path
) -> None:
    """Round 0 is the base model's validation loss at the sites: no training, no privacy spent.
    Every site builds the model from its own copy of the base (INIT), nothing crosses the network."""
    spec = _spec(tmp_path, tiny_base, resume=False)
    grid = FakeGrid([1, 2], evaluate=True)
    with pytest.raises(GridGone, match="pushed"):  # round 1's training messages
        _run(grid, spec)

    evaluated = [m for m in grid.pushed if m.metadata.message_type == MessageType.EVALUATE]
    trained = [m for m in grid.pushed if m.metadata.message_type == MessageType.TRAIN]
    assert {m.metadata.dst_node_id for m in evaluated} == {1, 2}
    assert {m.metadata.dst_node_id for m in trained} == {1, 2}
    assert grid.pushed == evaluated + trained  # the base is evaluated before round 1 trains
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint is not None
    shapes = expected_shapes(BaseModel.open(tiny_base).build(lora=None))
    for message in evaluated:
        config = message.content.config_records["config"]
        assert config["server-round"] == 0 and config["run-key"] == checkpoint.run_key
        assert config["base.hash"] == BaseModel.open(tiny_base).hash
        blob = read_payload(message.content)
        assert blob is not None
        header = unpack(blob, shapes, 1 << 30).header
        assert header.kind == Kind.INIT and header.target == model_hash(checkpoint.state)
        assert len(blob) < 1024  # the weights stay home: every site holds the folder

    rows = metrics.read_rows(tmp_path)
    assert [r["round"] for r in rows] == [0]
    assert rows[0]["train_loss"] is None and rows[0]["clients"] == 0
    assert (rows[0]["val_loss"], rows[0]["val_bpb"]) == (2.0, 1.5)
    assert checkpoint.round == 0  # (the row's checkpoint: round 0's model is the base)


def test_a_fresh_run_draws_a_new_run_key_and_clears_old_metrics(tmp_path: Path, tiny_base: Path) -> None:
    spec = _spec(tmp_path, tiny_base, resume=False)
    metrics.append_round(tmp_path, _row(1))
    keys = set()
    for _ in range(2):
        with pytest.raises(GridGone):
            _run(FakeGrid(fail=True), spec)
        checkpoint = load_checkpoint(tmp_path)
        assert checkpoint is not None and checkpoint.round == 0
        keys.add(checkpoint.run_key)
    assert len(keys) == 2  # resume: false starts another run, whose clients keep other state
    assert metrics.read_rows(tmp_path) == []


def test_a_fresh_run_clears_the_round_0_row_of_an_earlier_run(tmp_path: Path, tiny_base: Path) -> None:
    """Otherwise the new run's evaluation of the base adds a second round-0 row after the old one."""
    metrics.append_round(tmp_path, _row(0))
    with pytest.raises(GridGone):
        _run(FakeGrid(fail=True), _spec(tmp_path, tiny_base, resume=False))
    assert metrics.read_rows(tmp_path) == []


@pytest.mark.usefixtures("serverapp_task")
def test_a_run_ends_after_round_0_when_too_few_sites_remain(tmp_path: Path, tiny_base: Path) -> None:
    """Two sites evaluate the base, one is gone when round 1 samples: no round is trained, the
    run ends with the base's row only."""
    spec = _spec(tmp_path, tiny_base, resume=False, min_clients=2)
    # round 0: sample_nodes and the strategy each ask once; round 1: two sites, then one
    grid = FakeGrid([1, 2], [1, 2], [1, 2], [1], evaluate=True)
    _run(grid, spec)

    assert all(m.metadata.message_type == MessageType.EVALUATE for m in grid.pushed)
    assert (tmp_path / "DONE").read_text() == "0\n"
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.round == 0
    assert [(r["round"], r["train_loss"], r["val_loss"]) for r in metrics.read_rows(tmp_path)] == [
        (0, None, 2.0)
    ]


# --- a resumed run ------------------------------------------------------------------------------


@pytest.mark.usefixtures("serverapp_task")
def test_a_resumed_run_keeps_the_run_key_of_its_checkpoint(tmp_path: Path, tiny_base: Path) -> None:
    with pytest.raises(GridGone):
        _run(FakeGrid(fail=True), _spec(tmp_path, tiny_base, resume=False))
    first = load_checkpoint(tmp_path)
    assert first is not None
    metrics.append_round(tmp_path, _row(0))  # a round-0 row of the interrupted evaluation

    grid = FakeGrid([5, 6], evaluate=True)
    with pytest.raises(GridGone, match="pushed"):
        _run(grid, _spec(tmp_path, tiny_base, resume=True))

    assert {m.metadata.dst_node_id for m in grid.pushed} == {5, 6}
    rounds = []
    for message in grid.pushed:
        config = message.content.config_records["config"]
        assert config["run-key"] == first.run_key
        rounds.append((message.metadata.message_type, config["server-round"]))
    # from a round-0 checkpoint the base is evaluated again, then the run goes on with round 1
    assert sorted(set(rounds)) == [(MessageType.EVALUATE, 0), (MessageType.TRAIN, 1)]
    assert [r["round"] for r in metrics.read_rows(tmp_path)] == [0]  # its row replaced, not repeated
    assert metrics.read_rows(tmp_path)[0]["val_loss"] == 2.0
    again = load_checkpoint(tmp_path)
    assert again is not None and again.run_key == first.run_key and again.round == 0


def test_a_finished_run_is_not_run_again(tmp_path: Path, tiny_base: Path) -> None:
    spec = _spec(tmp_path, tiny_base, resume=True, rounds=2)
    base = BaseModel.open(tiny_base)
    state = wire_state(base.build(lora=None))
    save_checkpoint(tmp_path, Checkpoint(2, dict(state), {}, "abcd", _fingerprint(spec, base)))
    for server_round in (0, 1, 2, 3):  # a row past the checkpoint (written after it, before a crash)
        metrics.append_round(tmp_path, _row(server_round))

    _run(UntouchedGrid(), spec)

    assert [r["round"] for r in metrics.read_rows(tmp_path)] == [0, 1, 2]
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint is not None and (checkpoint.round, checkpoint.run_key) == (2, "abcd")


def test_a_restart_after_patience_ran_out_ends_the_run_with_the_best_round_kept(
    tmp_path: Path, tiny_base: Path
) -> None:
    """The crash came after round 3's row and before selection saw it: the restart decides as
    the uninterrupted run would have (round 1 stays the best; two rounds without better: stop)."""
    selection = {"metric": "val_loss", "patience": 2}
    spec = _spec(tmp_path, tiny_base, resume=True, rounds=5, selection=selection)
    base = BaseModel.open(tiny_base)
    state = wire_state(base.build(lora=None))
    for server_round, loss in ((0, 3.0), (1, 2.0), (2, 2.5), (3, 2.4)):
        save_checkpoint(tmp_path, Checkpoint(server_round, dict(state), {}, "abcd", _fingerprint(spec, base)))
        metrics.append_round(tmp_path, _row(server_round) | {"val_loss": loss})
        if server_round == 1:
            (tmp_path / BEST_CHECKPOINT).write_bytes((tmp_path / CHECKPOINT_NAME).read_bytes())

    _run(UntouchedGrid(), spec)

    assert (tmp_path / DONE_NAME).read_text() == "3\n"
    best = load_checkpoint(tmp_path, BEST_CHECKPOINT)
    assert best is not None and best.round == 1


@pytest.mark.parametrize(
    "other",
    [
        {"base": "00" * 32},  # another base folder
        {"lora": "LoraSpec(rank=8)"},  # adapters where the run trains every weight
    ],
)
def test_resuming_with_another_base_or_adapters_is_refused(
    tmp_path: Path, tiny_base: Path, other: dict[str, str]
) -> None:
    spec = _spec(tmp_path, tiny_base, resume=True)
    base = BaseModel.open(tiny_base)
    described = {"base": base.hash, **other}
    fingerprint = model_fingerprint(spec.federation.model.model_dump(), **described)
    assert fingerprint != _fingerprint(spec, base)
    save_checkpoint(tmp_path, Checkpoint(1, {}, {}, "abcd", fingerprint))
    metrics.append_round(tmp_path, _row(1))

    with pytest.raises(
        InputError, match=r"its checkpoint is of another base model or adapter setting.*new out_dir"
    ):
        _run(UntouchedGrid(), spec)
    assert len(metrics.read_rows(tmp_path)) == 1  # nothing touched
    assert json.loads((tmp_path / METRICS_NAME).read_text())["round"] == 1


@pytest.mark.usefixtures("serverapp_task")
def test_the_coordinator_scores_the_base_on_its_own_public_text_as_round_0(
    tmp_path: Path, tiny_base: Path
) -> None:
    """`public_val_loss`: the model the sites hold, scored on the held-out part of public text
    the coordinator names; the base's score is round 0's."""
    corpus = tmp_path / "public.jsonl"
    corpus.write_text(
        "".join(json.dumps({"answer": f"public answer number {i} about fevers"}) + "\n" for i in range(100))
    )
    public_eval = {"text": {"data": {"path": corpus, "field": "answer"}}, "max_records": 3}
    spec = _spec(
        tmp_path / "run", tiny_base, resume=False, train={"adapters": "lora"}, public_eval=public_eval
    )
    with pytest.raises(GridGone, match="pushed"):  # round 1's training messages
        _run(FakeGrid([1, 2], evaluate=True), spec)
    [row] = metrics.read_rows(tmp_path / "run")

    base = BaseModel.open(tiny_base)
    fed = spec.federation
    assert fed.public_eval is not None
    texts = public_text(fed.public_eval.text).val[:3]
    assert len(texts) == 3
    expected = held_out(
        base.build(lora=None).eval(), encode_records(base.tokenizer(), texts), 16, text_bytes(texts)
    )
    assert row["public_val_loss"] == pytest.approx(expected.loss, rel=1e-5)
    assert row["public_val_bpb"] == pytest.approx(expected.bits_per_byte, rel=1e-5)
    assert (row["val_loss"], row["val_bpb"]) == (2.0, 1.5)  # the sites' figures stay theirs


@pytest.mark.usefixtures("serverapp_task")
def test_a_run_without_public_evaluation_writes_no_public_figures(tmp_path: Path, tiny_base: Path) -> None:
    with pytest.raises(GridGone, match="pushed"):
        _run(FakeGrid([1, 2], evaluate=True), _spec(tmp_path, tiny_base, resume=False))
    assert "public_val_loss" not in metrics.read_rows(tmp_path)[0]
