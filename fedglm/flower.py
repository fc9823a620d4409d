"""Every place fedglm reaches into Flower's internals, in one module, for one Flower release.

fedglm builds on Flower's public Message API (`flwr.app`, `flwr.serverapp`, `flwr.clientapp`)
everywhere else. What that API does not offer is done here, against the internals of exactly
`FLOWER_VERSION` (pyproject.toml pins it; `check_version` refuses another):

- `flwr.cli.build.build_fab_from_disk`: the thin app bundle, built reproducibly;
- `flwr.supercore.control.ControlHttpClient`, `flwr.proto.control_pb2`, `flwr.common.serde`,
  `flwr.supercore.fab.Fab`: the Control API (submit a run, follow it, stream its log, stop it,
  register nodes), as `flwr run` uses it;
- `flwr.serverapp.strategy.strategy_utils.sample_nodes`: wait for and sample connected nodes;
- `flwr.supernode.runtime.run_clientapp` (`pull_task_input`, `install_from_fab`): the site's
  bundle check;
- `flwr.superlink.main._get_middleware`: the coordinator's loopback-only middleware;
- `flwr.superlink.servicer.control.control_handlers.start_run`, `flwr.supercore.error`:
  refusing a foreign bundle at StartRun, as a Flower API error;
- `flwr.superlink.runtime.run_serverapp.install_from_fab`: the coordinator's bundle check;
- `flwr.superlink.cli`, `flwr.supernode.cli`: Flower's entry points, run after the hooks.

`tests/test_flower.py` checks each touch point against the installed Flower, so an upgrade
shows at once which one moved. The guards' policies (what is refused, and why) live in
`clients/guard.py` and `server/guard.py`; this module only knows how to hook them in.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

from fedglm.errors import InputError

FLOWER_VERSION = "1.42.0"

BundleCheck = Callable[[bytes, str], None]  # (bundle bytes, its claimed SHA-256): raise to refuse


def check_version(installed: str | None = None) -> None:
    """Refuse a Flower release whose internals fedglm was not built against."""
    found = installed or version("flwr")
    if found != FLOWER_VERSION:
        raise InputError(
            f"fedglm needs flwr {FLOWER_VERSION} (its internals are used in fedglm/flower.py), found "
            f"{found}; reinstall fedglm (`make install`)"
        )


def build_fab(folder: Path) -> bytes:
    from flwr.cli.build import build_fab_from_disk

    content: bytes = build_fab_from_disk(folder)
    return content


def sample_nodes(grid: Any, min_available: int, min_sample: int) -> Any:
    """Wait until `min_available` nodes are connected and sample `min_sample` (Flower's helper)."""
    from flwr.serverapp.strategy.strategy_utils import sample_nodes as flower_sample_nodes

    return flower_sample_nodes(grid, min_available, min_sample)


# --- the Control API ----------------------------------------------------------------------------


def control_client(address: str, ca_cert: Path | None) -> Any:
    """Flower's HTTP client of a SuperLink's Control API (what `flwr run` uses)."""
    from flwr.supercore.control import ControlHttpClient

    return ControlHttpClient.from_server_address(
        server_address=address,
        insecure=ca_cert is None,
        root_certificates=ca_cert.read_bytes() if ca_cert else None,
        interceptors=[],
    )


def start_run_request(fab: bytes, run_config: Mapping[str, str | int | float | bool]) -> Any:
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    bundle = Fab(hashlib.sha256(fab).hexdigest(), fab, {})
    return StartRunRequest(fab=fab_to_proto(bundle), override_config=user_config_to_proto(dict(run_config)))


def list_runs_request(run_id: int) -> Any:
    from flwr.proto.control_pb2 import ListRunsRequest

    return ListRunsRequest(run_id=run_id)


def stop_run_request(run_id: int) -> Any:
    from flwr.proto.control_pb2 import StopRunRequest

    return StopRunRequest(run_id=run_id)


def stream_logs_request(run_id: int) -> Any:
    from flwr.proto.control_pb2 import StreamLogsRequest

    return StreamLogsRequest(run_id=run_id, after_timestamp=0.0)


def register_node_request(public_key: bytes, name: str) -> Any:
    from flwr.proto.control_pb2 import RegisterNodeRequest

    return RegisterNodeRequest(public_key=public_key, name=name)


# --- hooks for the guards -----------------------------------------------------------------------


def hook_clientapp_bundle_check(check: BundleCheck) -> None:
    """Make Flower's ClientApp runner call `check` on a bundle before it unpacks it.

    The check runs after the task was pulled, so a refusal becomes an error reply and the
    SuperNode carries on; nothing of the bundle has been written or imported."""
    runner = importlib.import_module("flwr.supernode.runtime.run_clientapp")
    original_pull, original_install = runner.pull_task_input, runner.install_from_fab
    pulled: dict[str, Any] = {}

    def pull(client: Any) -> Any:
        message, context, run, fab = original_pull(client)
        pulled["fab"] = fab
        return message, context, run, fab

    def install(content: bytes, *args: Any, **kwargs: Any) -> Any:
        check(content, pulled["fab"].hash_str)
        return original_install(content, *args, **kwargs)

    setattr(runner, "pull_task_input", pull)  # noqa: B010 (module attributes Flower looks up)
    setattr(runner, "install_from_fab", install)  # noqa: B010


def hook_serverapp_bundle_check(check: BundleCheck) -> None:
    """Make Flower's ServerApp runner call `check` on a bundle before it unpacks it (the
    ServerApp then fails, with nothing of the bundle written or imported)."""
    # (the package exports a function of the module's name: take the module itself)
    runner = importlib.import_module("flwr.superlink.runtime.run_serverapp")
    original_install = runner.install_from_fab

    def install(content: bytes, *args: Any, **kwargs: Any) -> Any:
        check(content, hashlib.sha256(content).hexdigest())
        return original_install(content, *args, **kwargs)

    setattr(runner, "install_from_fab", install)  # noqa: B010 (a module attribute Flower looks up)


def hook_superlink(middleware: Any, start_run_check: Callable[[Any], str | None]) -> None:
    """Put `middleware` (ASGI) outermost in the SuperLink's HTTP app, and refuse a StartRun
    request for which `start_run_check` returns a reason (a Flower "forbidden action" error)."""
    from flwr.supercore.error import ApiErrorCode, FlowerError
    from flwr.superlink import main as superlink_app
    from flwr.superlink.servicer.control import control_handlers
    from starlette.middleware import Middleware

    original_middleware, original_start_run = superlink_app._get_middleware, control_handlers.start_run

    def middlewares() -> list[Middleware]:
        return [Middleware(middleware), *original_middleware()]

    def start_run(request: Any, *args: Any, **kwargs: Any) -> Any:
        reason = start_run_check(request)
        if reason is not None:
            raise FlowerError(ApiErrorCode.FORBIDDEN_ACTION, reason, public_details=reason)
        return original_start_run(request, *args, **kwargs)

    superlink_app._get_middleware = middlewares
    control_handlers.start_run = start_run


def run_superlink() -> None:
    from flwr.superlink.cli import flower_superlink

    flower_superlink()


def run_serverapp() -> None:
    from flwr.superlink.cli import flwr_serverapp

    flwr_serverapp()


def run_clientapp() -> None:
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    flwr_clientapp()
