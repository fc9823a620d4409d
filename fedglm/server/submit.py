"""Submitting the fedglm app to a SuperLink and following it until it ends.

Uses the same internals as `flwr run` (the Control API over HTTPS, through `fedglm/flower.py`):
`StartRun` with the thin app bundle and the run config, stream the ServerApp's log to a file,
poll `ListRuns`; and `RegisterNode` for the hospitals the coordinator lists.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from fedglm import flower
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
        self._client = flower.control_client(address, ca_cert)

    def start_run(self, fab: bytes, run_config: Mapping[str, str | int | float | bool]) -> int:
        try:
            response = self._client.StartRun(flower.start_run_request(fab, run_config))
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
            response = self._client.RegisterNode(flower.register_node_request(public_key, name))
        except httpx.HTTPStatusError as exc:
            raise CheckFailed(f"the SuperLink refused node {name!r}: {_error_text(exc.response)}") from None
        if not response.node_id:
            raise CheckFailed(f"the SuperLink did not register node {name!r}")
        return int(response.node_id)

    def status(self, run_id: int) -> tuple[str, str, str]:
        run = self._client.ListRuns(flower.list_runs_request(run_id)).run_dict[run_id]
        return run.status.status, run.status.sub_status, run.status.details

    def stop_run(self, run_id: int) -> None:
        with contextlib.suppress(httpx.HTTPError):  # it may have finished already
            self._client.StopRun(flower.stop_run_request(run_id))

    def stream_logs(self, run_id: int, log_path: Path) -> threading.Thread:
        """Copy the ServerApp's log to `log_path` in a background thread until the run ends."""

        def pump() -> None:
            try:
                with log_path.open("a", encoding="utf-8") as handle:
                    for reply in self._client.StreamLogs(flower.stream_logs_request(run_id)):
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
