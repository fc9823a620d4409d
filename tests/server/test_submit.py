"""Submitting the fedglm app and following its run (`fedglm/server/submit.py`), against fakes of
Flower's Control API client: no SuperLink is started."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any, cast

import httpx
import pytest
from flwr.proto.control_pb2 import RegisterNodeResponse, StartRunResponse

from fedglm.errors import CheckFailed
from fedglm.server.submit import ControlClient, RunOutcome, _error_text, follow_run

REQUEST = httpx.Request("POST", "https://127.0.0.1:9093/StartRun")

# --- _error_text --------------------------------------------------------------------------------


def test_error_text_joins_detail_and_extra() -> None:
    response = httpx.Response(400, json={"detail": "Invalid FAB", "extra": "hash mismatch"}, request=REQUEST)
    assert _error_text(response) == "Invalid FAB: hash mismatch"
    only_detail = httpx.Response(403, json={"detail": "not allowed", "extra": ""}, request=REQUEST)
    assert _error_text(only_detail) == "not allowed"


def test_error_text_without_a_json_reason_is_the_status_code() -> None:
    assert _error_text(httpx.Response(502, text="<html>Bad gateway</html>", request=REQUEST)) == "HTTP 502"
    assert _error_text(httpx.Response(500, json=["not", "a", "dict"], request=REQUEST)) == "HTTP 500"
    assert _error_text(httpx.Response(500, json={"other": "x"}, request=REQUEST)) == "HTTP 500"


def test_error_text_is_one_short_line() -> None:
    detail = "line one\nline two\r\n\tindented   " + "x" * 1000
    text = _error_text(httpx.Response(400, json={"detail": detail}, request=REQUEST))
    assert text.startswith("line one line two indented x")
    assert "\n" not in text and "\t" not in text and "  " not in text
    assert len(text) == 300
    assert len(_error_text(httpx.Response(400, json={"detail": detail}, request=REQUEST), limit=20)) == 20


# --- ControlClient's errors (its Flower client faked) ------------------------------------------


class FakeHttpClient:
    """Stands in for Flower's ControlHttpClient: answers or raises what it is given."""

    def __init__(self, start: Any = None, register: Any = None) -> None:
        self.start, self.register = start, register
        self.requests: list[Any] = []

    @staticmethod
    def _answer(value: Any) -> Any:
        if isinstance(value, BaseException):
            raise value
        return value

    def StartRun(self, request: Any) -> Any:
        self.requests.append(request)
        return self._answer(self.start)

    def RegisterNode(self, request: Any) -> Any:
        self.requests.append(request)
        return self._answer(self.register)


def _control(fake: FakeHttpClient) -> ControlClient:
    client = ControlClient.__new__(ControlClient)  # without connecting anywhere
    client._client = fake
    return client


def _refusal(status: int, body: dict[str, str]) -> httpx.HTTPStatusError:
    response = httpx.Response(status, json=body, request=REQUEST)
    return httpx.HTTPStatusError("refused", request=REQUEST, response=response)


def test_start_run_sends_the_bundle_with_its_hash_and_returns_the_run_id() -> None:
    fake = FakeHttpClient(start=StartRunResponse(run_id=42))
    assert _control(fake).start_run(b"fab bytes", {"fedglm-spec": "/runs/a/run-spec.json"}) == 42
    (request,) = fake.requests
    assert request.fab.hash_str == hashlib.sha256(b"fab bytes").hexdigest()
    assert request.fab.content == b"fab bytes"
    assert request.override_config["fedglm-spec"].string == "/runs/a/run-spec.json"


def test_a_refused_run_is_one_line_with_the_superlinks_reason() -> None:
    fake = FakeHttpClient(start=_refusal(400, {"detail": "app refused", "extra": "sha256=ab\ncd"}))
    with pytest.raises(CheckFailed, match=r"^the SuperLink refused the run: app refused: sha256=ab cd$"):
        _control(fake).start_run(b"fab", {})
    unreachable = FakeHttpClient(start=httpx.ConnectError("connection refused", request=REQUEST))
    with pytest.raises(CheckFailed, match="the SuperLink refused the run: connection refused"):
        _control(unreachable).start_run(b"fab", {})
    with pytest.raises(CheckFailed, match="no run id returned"):
        _control(FakeHttpClient(start=StartRunResponse())).start_run(b"fab", {})


def test_register_node_returns_the_id_or_names_the_refused_site() -> None:
    assert _control(FakeHttpClient(register=RegisterNodeResponse(node_id=7))).register_node(b"pem", "h1") == 7
    refused = FakeHttpClient(register=_refusal(409, {"detail": "public key already in use"}))
    with pytest.raises(CheckFailed, match=r"refused node 'h1': public key already in use"):
        _control(refused).register_node(b"pem", "h1")
    with pytest.raises(CheckFailed, match="did not register node 'h2'"):
        _control(FakeHttpClient(register=RegisterNodeResponse())).register_node(b"pem", "h2")


# --- follow_run ---------------------------------------------------------------------------------


class FakeControl:
    """A ControlClient as `follow_run` uses it: a scripted sequence of run statuses."""

    def __init__(self, statuses: Iterable[tuple[str, str, str] | BaseException]) -> None:
        self.statuses = list(statuses)
        self.asked: list[int] = []
        self.stopped: list[int] = []

    def status(self, run_id: int) -> tuple[str, str, str]:
        self.asked.append(run_id)
        value = self.statuses.pop(0)
        if isinstance(value, BaseException):
            raise value
        return value

    def stop_run(self, run_id: int) -> None:
        self.stopped.append(run_id)


def _follow(fake: FakeControl, ticks: list[int], alive: Any = lambda: True) -> RunOutcome:
    return follow_run(cast(ControlClient, fake), 5, on_tick=lambda: ticks.append(1), alive=alive, poll_s=0.0)


def test_follow_run_polls_until_finished_and_ticks_each_time() -> None:
    fake = FakeControl([("pending", "", ""), ("running", "", ""), ("finished", "completed", "")])
    ticks: list[int] = []
    outcome = _follow(fake, ticks)
    assert outcome == RunOutcome(run_id=5, sub_status="completed", details="")
    assert outcome.succeeded
    assert fake.asked == [5, 5, 5] and len(ticks) == 3
    assert fake.stopped == []


def test_follow_run_returns_a_failed_run_with_its_details() -> None:
    fake = FakeControl([("running", "", ""), ("finished", "failed", "ServerApp raised ValueError")])
    outcome = _follow(fake, [])
    assert not outcome.succeeded
    assert (outcome.sub_status, outcome.details) == ("failed", "ServerApp raised ValueError")


def test_follow_run_fails_when_the_superlink_is_gone() -> None:
    fake = FakeControl([("running", "", "")] * 5)
    answers = iter([True, True, False])
    ticks: list[int] = []
    with pytest.raises(CheckFailed, match="the SuperLink stopped while the run was going"):
        _follow(fake, ticks, alive=lambda: next(answers))
    assert len(fake.asked) == 2 and len(ticks) == 2  # not asked again once it was found dead


@pytest.mark.parametrize("where", ["status", "tick"])
def test_ctrl_c_stops_the_run_and_is_raised_again(where: str) -> None:
    interrupt = KeyboardInterrupt()
    statuses: list[tuple[str, str, str] | BaseException] = [("running", "", "")]
    statuses += [interrupt] if where == "status" else [("running", "", "")]
    fake = FakeControl(statuses)
    calls = []

    def tick() -> None:
        calls.append(1)
        if where == "tick" and len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        follow_run(cast(ControlClient, fake), 9, on_tick=tick, alive=lambda: True, poll_s=0.0)
    assert fake.stopped == [9]
