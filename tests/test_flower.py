"""Each of Flower's internals fedglm touches (`fedglm/flower.py`), checked against the installed
Flower: an upgrade that moves one fails here, by name, before anything runs."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import io
import zipfile
from typing import Any

import pytest

from fedglm import flower
from fedglm.app_bundle import FAB_DIR
from fedglm.errors import InputError


def test_the_installed_flower_is_the_one_fedglm_was_built_against() -> None:
    flower.check_version()
    with pytest.raises(InputError, match=r"fedglm needs flwr 1\.42\.0 .* found 1\.41\.0"):
        flower.check_version("1.41.0")


def test_build_fab_makes_a_zip_holding_the_apps_pyproject() -> None:
    content = flower.build_fab(FAB_DIR)
    with zipfile.ZipFile(io.BytesIO(content)) as bundle:
        assert "pyproject.toml" in bundle.namelist()
    assert content == flower.build_fab(FAB_DIR)


def test_control_api_requests_carry_what_fedglm_sends() -> None:
    fab = flower.build_fab(FAB_DIR)
    start = flower.start_run_request(fab, {"fedglm-spec": "/x/run-spec.json"})
    assert start.fab.content == fab and start.fab.hash_str == hashlib.sha256(fab).hexdigest()
    assert "fedglm-spec" in start.override_config
    assert flower.list_runs_request(7).run_id == 7
    assert flower.stop_run_request(7).run_id == 7
    assert flower.stream_logs_request(7).run_id == 7
    register = flower.register_node_request(b"PEM", "h1")
    assert (register.public_key, register.name) == (b"PEM", "h1")


def test_the_control_client_has_the_calls_fedglm_makes() -> None:
    from flwr.supercore.control import ControlHttpClient

    assert callable(ControlHttpClient.from_server_address)
    for call in ("StartRun", "ListRuns", "StopRun", "StreamLogs", "RegisterNode", "close"):
        assert hasattr(ControlHttpClient, call), call


def test_sample_nodes_takes_a_grid_and_two_counts() -> None:
    from flwr.serverapp.strategy.strategy_utils import sample_nodes

    assert list(inspect.signature(sample_nodes).parameters)[:3] == [
        "grid",
        "min_available_nodes",
        "sample_size",
    ]


def test_the_clientapp_hook_checks_the_bundle_before_flower_installs_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runner = importlib.import_module("flwr.supernode.runtime.run_clientapp")
    fab = type("Fab", (), {"hash_str": "claimed"})()
    installed: list[bytes] = []
    monkeypatch.setattr(runner, "pull_task_input", lambda client: ("m", "c", "r", fab))
    monkeypatch.setattr(runner, "install_from_fab", lambda content, *a, **k: installed.append(content))
    seen: list[tuple[bytes, str]] = []

    def check(content: bytes, claimed: str) -> None:
        seen.append((content, claimed))
        if content == b"foreign":
            raise RuntimeError("refused")

    flower.hook_clientapp_bundle_check(check)
    assert runner.pull_task_input(None)[3] is fab
    with pytest.raises(RuntimeError, match="refused"):
        runner.install_from_fab(b"foreign")
    runner.install_from_fab(b"ours")
    assert seen == [(b"foreign", "claimed"), (b"ours", "claimed")] and installed == [b"ours"]


def test_the_serverapp_hook_checks_the_bundle_by_its_own_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = importlib.import_module("flwr.superlink.runtime.run_serverapp")
    monkeypatch.setattr(runner, "install_from_fab", lambda content, *a, **k: None)
    seen: list[tuple[bytes, str]] = []
    flower.hook_serverapp_bundle_check(lambda content, claimed: seen.append((content, claimed)))
    runner.install_from_fab(b"bundle", skip_prompt=True)
    assert seen == [(b"bundle", hashlib.sha256(b"bundle").hexdigest())]


def test_the_superlink_hook_adds_the_middleware_first_and_refuses_start_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr.supercore.error import FlowerError
    from flwr.superlink import main as superlink_app
    from flwr.superlink.servicer.control import control_handlers

    monkeypatch.setattr(superlink_app, "_get_middleware", superlink_app._get_middleware)
    monkeypatch.setattr(control_handlers, "start_run", lambda request, *a, **k: "started")

    class Outer:
        def __init__(self, app: Any) -> None:
            self.app = app

    flower.hook_superlink(Outer, lambda request: "foreign" if request == "rogue" else None)
    assert superlink_app._get_middleware()[0].cls is Outer
    assert control_handlers.start_run("ours") == "started"
    with pytest.raises(FlowerError) as refused:
        control_handlers.start_run("rogue")
    assert refused.value.public_details == "foreign"


def test_flowers_entry_points_are_where_fedglm_calls_them() -> None:
    from flwr.superlink.cli import flower_superlink, flwr_serverapp
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    assert all(callable(f) for f in (flower_superlink, flwr_serverapp, flwr_clientapp))
