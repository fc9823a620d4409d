"""The coordinator's guards, each as the attack: a peer from afar, a foreign bundle, a Hub app."""

from __future__ import annotations

import asyncio
import hashlib
import importlib
from typing import Any

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.proto.control_pb2 import StartRunRequest
from flwr.proto.fab_pb2 import Fab

from fedglm import flower
from fedglm.app_bundle import AppRefused, check_fab, fab_bytes, fab_sha256
from fedglm.server.guard import LoopbackOnly, check_start_run, is_loopback
from tests.conftest import ROOT


def _call(path: str, peer: str | None) -> tuple[int, bool]:
    """Status sent by LoopbackOnly for a request to `path` from `peer`, and whether Flower saw it."""
    reached: list[bool] = []
    sent: list[dict[str, Any]] = []

    async def flower(scope: Any, receive: Any, send: Any) -> None:
        reached.append(True)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "path": path, "client": (peer, 40000) if peer else None}
    asyncio.run(LoopbackOnly(flower)(scope, receive, send))
    return int(sent[0]["status"]), bool(reached)


@pytest.mark.parametrize(
    "path",
    ["/v1/control/start-run", "/v1/control/register-node", "/v1/runtime/pull-task-input", "/docs", "/"],
)
@pytest.mark.parametrize("peer", ["10.1.2.3", "192.168.0.7", "2001:db8::1", None])
def test_a_peer_from_afar_reaches_nothing_but_the_fleet_api(path: str, peer: str | None) -> None:
    assert _call(path, peer) == (403, False)


def test_sneaking_past_the_allow_list_is_refused() -> None:
    assert _call("/v1/fleet/../control/start-run", "10.1.2.3") == (403, False)
    assert _call("/v1/fleetx/start-run", "10.1.2.3") == (403, False)


@pytest.mark.parametrize("path", ["/v1/fleet/pull-messages", "/v1/fleet/register-node", "/health"])
def test_sites_reach_the_fleet_api_and_health(path: str) -> None:
    assert _call(path, "10.1.2.3") == (200, True)


@pytest.mark.parametrize("peer", ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"])
def test_the_coordinators_own_machine_reaches_every_api(peer: str) -> None:
    assert is_loopback(peer)
    assert _call("/v1/control/start-run", peer) == (200, True)


def _start_run(content: bytes, hash_str: str | None = None, app_spec: str = "") -> StartRunRequest:
    fab = Fab(hash_str=hash_str or hashlib.sha256(content).hexdigest(), content=content)
    return StartRunRequest(fab=fab, app_spec=app_spec)


def test_start_run_takes_only_fedglms_own_bundle() -> None:
    allowed = {fab_sha256()}
    check_start_run(_start_run(fab_bytes()), allowed)
    rogue = build_fab_from_disk(ROOT / "tests" / "assets" / "rogue_app")
    with pytest.raises(AppRefused, match="refused app bundle sha256="):
        check_start_run(_start_run(rogue), allowed)
    with pytest.raises(AppRefused, match="claimed hash"):
        check_start_run(_start_run(fab_bytes(), hash_str="0" * 64), allowed)
    with pytest.raises(AppRefused, match="refused app bundle sha256="):  # a stored app: no content
        check_start_run(_start_run(b"", hash_str=fab_sha256()), allowed)
    with pytest.raises(AppRefused, match="refused app 'flwr/rogue'"):
        check_start_run(_start_run(fab_bytes(), app_spec="flwr/rogue"), allowed)


def test_the_serverapp_unpacks_no_foreign_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = importlib.import_module("flwr.superlink.runtime.run_serverapp")
    installed: list[bytes] = []
    monkeypatch.setattr(runner, "install_from_fab", lambda content, *a, **k: installed.append(content))
    flower.hook_serverapp_bundle_check(lambda content, claimed: check_fab(content, claimed, {fab_sha256()}))
    rogue = build_fab_from_disk(ROOT / "tests" / "assets" / "rogue_app")
    with pytest.raises(AppRefused):
        runner.install_from_fab(rogue, skip_prompt=True)
    assert installed == []
    runner.install_from_fab(fab_bytes(), skip_prompt=True)
    assert installed == [fab_bytes()]
