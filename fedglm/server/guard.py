"""The coordinator executes fedglm's own app only, and takes runs only from its own machine.

Flower's SuperLink serves three APIs on one port: the Fleet API (SuperNodes), the Control API
(run submission, node registration, logs) and the runtime API (what the ServerApp and the
SuperExec use). In open-source Flower (1.41 and 1.42) the Control API has no authentication and, with
subprocess isolation, neither has the runtime API; yet the port must be open to the hospitals,
and every hospital holds the public `ca.crt`. Unguarded, anyone who reaches the port can submit
an app whose ServerApp runs on the coordinator's machine, as the user holding `receipt.key` and
`ca.key`, or talk to the running ServerApp's own API.

So fedglm starts the SuperLink through `superlink_main`: Flower's `flower-superlink` with
- `LoopbackOnly` as the outermost HTTP middleware: a peer that is not on a loopback address
  reaches only the Fleet API (`/v1/fleet/...`) and `/health`; every other path answers 403
  before Flower parses a byte of the request. It is an allow-list, so an API Flower adds later
  is closed from afar until fedglm opens it. The peer address is the TCP peer uvicorn sees
  (no proxy headers are trusted).
- StartRun accepting only fedglm's own bundle, given by content (no Flower Hub app, no stored
  app): any other is refused at submission, before a run exists.
- the guarded `flwr-serverapp` (`serverapp_main`) first on the PATH the SuperExec searches: it
  checks the bundle's hash before Flower unpacks it, so a foreign app is never executed even
  if one got past the check above (say, through a later Flower path to create runs).
- the SuperExec and every ServerApp started through shims that make each die with its parent
  (`processes.die_with_parent`): killing `fedglm server`, even with SIGKILL, leaves no Flower
  process behind to go on training.

What remains: whoever has a shell on the coordinator's machine reaches loopback, so the
coordinator runs on a machine of its own; the hospitals still reach the Fleet API (that is the
point), where SuperNode authentication (`fedglm/server/nodes.py`) admits only listed nodes.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from fedglm import flower
from fedglm.app_bundle import ALLOWED_ENV, AppRefused, allowed_hashes, check_fab, write_shim
from fedglm.processes import die_with_parent, executable

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PUBLIC_PREFIX = "/v1/fleet/"
PUBLIC_PATHS = frozenset({"/health"})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def public_path(path: str) -> bool:
    return path in PUBLIC_PATHS or (path.startswith(PUBLIC_PREFIX) and ".." not in path)


class LoopbackOnly:
    """ASGI middleware: a non-loopback peer reaches only the Fleet API and /health."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not public_path(str(scope.get("path", ""))):
            client = scope.get("client")
            if not client or not is_loopback(str(client[0])):
                await _forbidden(scope, send)
                return
        await self.app(scope, receive, send)


async def _forbidden(scope: Scope, send: Send) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    body = json.dumps({"detail": "fedglm: this API answers only on the coordinator's own machine"}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 403, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def check_start_run(request: Any, allowed: set[str]) -> None:
    """Raise `AppRefused` unless a StartRun request carries an allowed bundle by content."""
    if request.app_spec:
        raise AppRefused(f"refused app {request.app_spec!r}: this coordinator runs only fedglm's own app")
    check_fab(bytes(request.fab.content), request.fab.hash_str or "", allowed)


def refusal(request: Any, allowed: set[str]) -> str | None:
    """Why a StartRun request is refused (`check_start_run`), or None."""
    try:
        check_start_run(request, allowed)
    except AppRefused as exc:
        return str(exc)
    return None


def superlink_main() -> None:
    """`flower-superlink` with fedglm's guards (same arguments as Flower's)."""
    die_with_parent()
    if not allowed_hashes():
        print(f"fedglm guard: {ALLOWED_ENV} is not set; refusing to start", file=sys.stderr)
        sys.exit(2)
    allowed = allowed_hashes()
    flower.hook_superlink(LoopbackOnly, lambda request: refusal(request, allowed))
    flower.run_superlink()


def serverapp_main() -> None:
    """The guarded `flwr-serverapp`: Flower's, checking the bundle before it is unpacked."""
    die_with_parent()
    allowed = allowed_hashes()
    if not allowed:
        print(f"fedglm guard: {ALLOWED_ENV} is not set; refusing to run any app", file=sys.stderr)
        sys.exit(2)
    flower.hook_serverapp_bundle_check(lambda content, claimed: check_fab(content, claimed, allowed))
    flower.run_serverapp()


def superexec_main() -> None:
    """`flower-superexec`, dying with the SuperLink that started it."""
    die_with_parent()
    real = executable("flower-superexec")
    os.execv(real, [real, *sys.argv[1:]])


def write_coordinator_shims(bin_dir: Path) -> Path:
    """The guarded `flwr-serverapp` and `flower-superexec` in `bin_dir` (to go first on PATH)."""
    write_shim(bin_dir, "flwr-serverapp", "fedglm.server.guard:serverapp_main")
    write_shim(bin_dir, "flower-superexec", "fedglm.server.guard:superexec_main")
    return bin_dir
