"""Submitting the fedglm app to a SuperLink and following it until it ends.

Uses the same internals as `flwr run` (the Control API over HTTPS): build the thin app bundle,
`StartRun` with the run config, stream the ServerApp's log to a file, poll `ListRuns`. These
are internal Flower APIs, which is why `flwr` is pinned to one version in pyproject.toml.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
from flwr.common.serde import fab_to_proto, user_config_to_proto
from flwr.proto.control_pb2 import (
    ListRunsRequest,
    RegisterNodeRequest,
    StartRunRequest,
    StopRunRequest,
    StreamLogsRequest,
)
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.fab import Fab

from fedglm.errors import CheckFailed


@dataclass(frozen=True)
class RunOutcome:
    run_id: int
    sub_status: str
    details: str

    @property
    def succeeded(self) -> bool:
        return self.sub_status == "completed"


class ControlClient:
    """A connection to a SuperLink's Control API."""

    def __init__(self, address: str, ca_cert: Path | None) -> None:
        self._client = ControlHttpClient.from_server_address(
            server_address=address,
            insecure=ca_cert is None,
            root_certificates=ca_cert.read_bytes() if ca_cert else None,
            interceptors=[],
        )

    def start_run(self, fab: bytes, run_config: Mapping[str, str | int | float | bool]) -> int:
        bundle = Fab(hashlib.sha256(fab).hexdigest(), fab, {})
        try:
            response = self._client.StartRun(
                StartRunRequest(
                    fab=fab_to_proto(bundle), override_config=user_config_to_proto(dict(run_config))
                )
            )
        except httpx.HTTPStatusError as exc:
            raise CheckFailed(f"the SuperLink refused the run: {_error_text(exc.response)}") from None
        except httpx.HTTPError as exc:
            raise CheckFailed(f"the SuperLink refused the run: {exc}") from None
        if not response.HasField("run_id"):
            raise CheckFailed("the SuperLink did not accept the run (no run id returned)")
        return int(response.run_id)

    def register_node(self, public_key: bytes, name: str) -> int:
        """Admit the SuperNode holding `public_key` (PEM); its node id."""
        try:
            response = self._client.RegisterNode(RegisterNodeRequest(public_key=public_key, name=name))
        except httpx.HTTPStatusError as exc:
            raise CheckFailed(f"the SuperLink refused node {name!r}: {_error_text(exc.response)}") from None
        if not response.node_id:
            raise CheckFailed(f"the SuperLink did not register node {name!r}")
        return int(response.node_id)

    def status(self, run_id: int) -> tuple[str, str, str]:
        run = self._client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict[run_id]
        return run.status.status, run.status.sub_status, run.status.details

    def stop_run(self, run_id: int) -> None:
        with contextlib.suppress(httpx.HTTPError):  # it may have finished already
            self._client.StopRun(StopRunRequest(run_id=run_id))

    def stream_logs(self, run_id: int, log_path: Path) -> threading.Thread:
        """Copy the ServerApp's log to `log_path` in a background thread until the run ends."""

        def pump() -> None:
            try:
                with log_path.open("a", encoding="utf-8") as handle:
                    for reply in self._client.StreamLogs(
                        StreamLogsRequest(run_id=run_id, after_timestamp=0.0)
                    ):
                        handle.write(reply.log_output)
                        handle.flush()
            except Exception:  # the stream ends with the run or the SuperLink
                return

        thread = threading.Thread(target=pump, name=f"logs-{run_id}", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self._client.close()


def _error_text(response: httpx.Response, limit: int = 300) -> str:
    """The reason a Flower API gave for an error (its JSON `detail` and `extra`), one line."""
    try:
        body = response.json()
    except ValueError:
        body = None
    parts = [str(body[k]) for k in ("detail", "extra") if body.get(k)] if isinstance(body, dict) else []
    text = ": ".join(parts) or f"HTTP {response.status_code}"
    return " ".join(text.split())[:limit]


def follow_run(
    client: ControlClient,
    run_id: int,
    *,
    on_tick: Callable[[], None],
    alive: Callable[[], bool],
    poll_s: float = 0.5,
) -> RunOutcome:
    """Poll until the run finishes, calling `on_tick` each time; stop it on Ctrl-C."""
    try:
        while True:
            if not alive():
                raise CheckFailed("the SuperLink stopped while the run was going")
            status, sub_status, details = client.status(run_id)
            on_tick()
            if status == "finished":
                return RunOutcome(run_id=run_id, sub_status=sub_status, details=details)
            time.sleep(poll_s)
    except KeyboardInterrupt:
        client.stop_run(run_id)
        raise
