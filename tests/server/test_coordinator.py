"""The coordinator's job around a run (`fedglm/server/coordinator.py`): its spec and receipt key,
the listed hospitals' keys, and following a run (Flower's Control API client faked)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, cast

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedglm import metrics
from fedglm.app_bundle import fab_bytes
from fedglm.config import FederationConfig, ListedSite, RunSpec
from fedglm.errors import CheckFailed
from fedglm.layout import SPEC_KEY, SPEC_NAME
from fedglm.nodes import make_node_keys, read_node_public_key
from fedglm.privacy.keys import load_private_key, load_public_key
from fedglm.processes import ManagedProcess
from fedglm.server import coordinator
from fedglm.server.coordinator import execute_run, read_listed_keys, write_spec
from fedglm.server.submit import follow_run

# --- write_spec ---------------------------------------------------------------------------------


def test_write_spec_makes_the_receipt_key_once_and_writes_the_spec(tmp_path: Path) -> None:
    out = tmp_path / "run"  # does not exist yet
    federation = FederationConfig(rounds=4, min_clients=2, aggregation="median")
    path = write_spec(out, federation, resume=False, nodes={101: "h1", 202: "h2"})

    assert path == out / SPEC_NAME
    private, public = out / "receipt.key", out / "receipt.pub"
    assert private.is_file() and public.is_file()
    assert load_private_key(private).public_key() == load_public_key(public)
    spec = RunSpec.model_validate_json(path.read_text(encoding="utf-8"))
    assert spec.federation == federation
    assert spec.out_dir == out and spec.resume is False
    assert spec.receipt_key == private
    assert spec.nodes == {101: "h1", 202: "h2"}

    # A second spec (a restart) keeps the key: receipts already given out stay verifiable.
    key_before = private.read_bytes()
    again = write_spec(out, federation.model_copy(update={"rounds": 6}), resume=True)
    assert private.read_bytes() == key_before
    spec = RunSpec.model_validate_json(again.read_text(encoding="utf-8"))
    assert spec.federation.rounds == 6 and spec.resume is True and spec.nodes is None


def test_write_spec_uses_a_receipt_key_kept_elsewhere(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "coordinator.key"
    path = write_spec(tmp_path / "run", FederationConfig(), resume=True, receipt_key=key)
    assert key.is_file() and (tmp_path / "keys" / "coordinator.pub").is_file()
    assert not (tmp_path / "run" / "receipt.key").exists()
    assert RunSpec.model_validate_json(path.read_text(encoding="utf-8")).receipt_key == key


# --- read_listed_keys ---------------------------------------------------------------------------


def test_read_listed_keys_maps_each_name_to_its_pem(tmp_path: Path) -> None:
    sites = []
    for name in ("h2", "h1", "h3"):
        _, public = make_node_keys(tmp_path / name)
        sites.append(ListedSite(name=name, node_key=public))
    keys = read_listed_keys(sites)

    assert list(keys) == ["h2", "h1", "h3"]
    assert len(set(keys.values())) == 3
    for site in sites:
        pem = keys[site.name]
        assert pem == read_node_public_key(site.node_key, "node_key")
        assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
        assert isinstance(serialization.load_pem_public_key(pem), ec.EllipticCurvePublicKey)
    assert read_listed_keys([]) == {}


# --- execute_run (ControlClient faked) ----------------------------------------------------------


class FakeProcess:
    def __init__(self, name: str, alive: bool = True, tail: str = "") -> None:
        self.name, self._alive, self._tail = name, alive, tail

    def alive(self) -> bool:
        return self._alive

    def log_tail(self, lines: int = 3) -> str:
        return self._tail


def _row(server_round: int) -> dict[str, Any]:
    return {k: 0 for k in metrics.REQUIRED_KEYS} | {"round": server_round}


class FakeControl:
    """The Control API as `execute_run` uses it; `statuses` scripts what `status` answers, and
    `rounds_at` which metrics rows the ServerApp has appended by the n-th poll."""

    instances: ClassVar[list[FakeControl]] = []
    statuses: ClassVar[list[tuple[str, str, str]]] = []
    rounds_at: ClassVar[dict[int, int]] = {}
    out_dir: ClassVar[Path] = Path()

    def __init__(self, address: str, ca_cert: Path | None) -> None:
        self.address, self.ca_cert = address, ca_cert
        self.started: list[tuple[bytes, dict[str, Any]]] = []
        self.streamed: list[tuple[int, Path]] = []
        self.closed = False
        self.polls = 0
        type(self).instances.append(self)

    def start_run(self, fab: bytes, run_config: dict[str, Any]) -> int:
        self.started.append((fab, dict(run_config)))
        return 17

    def stream_logs(self, run_id: int, log_path: Path) -> None:
        self.streamed.append((run_id, log_path))

    def status(self, run_id: int) -> tuple[str, str, str]:
        self.polls += 1
        for server_round in range(1, self.rounds_at.get(self.polls, 0) + 1):
            if server_round not in {int(r["round"]) for r in metrics.read_rows(self.out_dir)}:
                metrics.append_round(self.out_dir, _row(server_round))
        return self.statuses[min(self.polls, len(self.statuses)) - 1]

    def stop_run(self, run_id: int) -> None:
        raise AssertionError("not expected")

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def control(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> type[FakeControl]:
    fake = type("Control", (FakeControl,), {"instances": [], "out_dir": tmp_path, "rounds_at": {}})
    monkeypatch.setattr(coordinator, "ControlClient", fake)
    monkeypatch.setattr(coordinator, "follow_run", _fast_follow(follow_run))
    return fake


def _fast_follow(follow: Any) -> Any:
    def fast(*args: Any, **kwargs: Any) -> Any:
        return follow(*args, **kwargs, poll_s=0.0)

    return fast


def _execute(tmp_path: Path, rows: list[dict[str, Any]], **processes: Any) -> list[dict[str, Any]]:
    return execute_run(
        superlink=cast(ManagedProcess, processes.get("superlink", FakeProcess("SuperLink"))),
        address="127.0.0.1:9093",
        ca_cert=None,
        spec_path=tmp_path / SPEC_NAME,
        out_dir=tmp_path,
        on_row=rows.append,
        processes=cast(list[ManagedProcess], processes.get("others", [])),
    )


def test_execute_run_submits_the_app_and_reports_each_new_round_once(
    tmp_path: Path, control: type[FakeControl]
) -> None:
    metrics.append_round(tmp_path, _row(1))  # a resumed run: round 1 was reported before
    control.statuses = [("running", "", "")] * 3 + [("finished", "completed", "")]
    control.rounds_at = {2: 2, 4: 3}
    reported: list[dict[str, Any]] = []

    rows = _execute(tmp_path, reported)

    (client,) = control.instances
    assert client.started == [(fab_bytes(), {SPEC_KEY: str(tmp_path / SPEC_NAME)})]
    assert client.streamed == [(17, tmp_path / "serverapp.log")]
    assert [r["round"] for r in reported] == [2, 3]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert client.closed


def test_execute_run_fails_with_the_run_s_reason(tmp_path: Path, control: type[FakeControl]) -> None:
    control.statuses = [("finished", "failed", "round 1: no valid training reply")]
    with pytest.raises(CheckFailed) as caught:
        _execute(tmp_path, [])
    assert str(caught.value) == (
        f"run 17 failed: round 1: no valid training reply (see {tmp_path / 'serverapp.log'})"
    )
    assert control.instances[0].closed


def test_execute_run_fails_when_a_watched_process_died(tmp_path: Path, control: type[FakeControl]) -> None:
    control.statuses = [("running", "", "")]
    dead = FakeProcess("SuperNode h2", alive=False, tail="Killed")
    with pytest.raises(CheckFailed, match=r"^SuperNode h2 exited unexpectedly: Killed$"):
        _execute(tmp_path, [], others=[FakeProcess("SuperNode h1"), dead])
    assert control.instances[0].polls == 0  # found before asking the SuperLink
    assert control.instances[0].closed

    with pytest.raises(CheckFailed, match=r"^SuperLink exited unexpectedly: bind failed$"):
        _execute(tmp_path, [], superlink=FakeProcess("SuperLink", alive=False, tail="bind failed"))
