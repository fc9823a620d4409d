"""Starting Flower's SuperNode for a hospital, and checking the coordinator before that.

Before the SuperNode starts, `preflight` reaches the coordinator's /health over TLS with the
site's CA certificate: a wrong CA certificate is a clear error at once (exit 2), an unreachable
coordinator is retried with exponential backoff. The SuperNode's local runtime port is bound to
127.0.0.1 only; the site's spec reaches the ClientApp as the node config value `fedglm-site`.
"""

from __future__ import annotations

import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from fedglm.app_bundle import ALLOWED_ENV, fab_sha256
from fedglm.clients.guard import write_clientapp_shim
from fedglm.clients.site import SITE_KEY
from fedglm.errors import CheckFailed, InputError
from fedglm.flower import check_version
from fedglm.nodes import NODE_PUB
from fedglm.processes import (
    ManagedProcess,
    check_port_free,
    executable,
    flower_env,
    start,
    wait_healthy,
)


def preflight(
    coordinator: str,
    ca_cert: Path | None,
    *,
    give_up_after: float | None,
    on_retry: Callable[[str, float], None],
) -> None:
    """Return once the coordinator answers; raise InputError on a certificate mismatch."""
    scheme = "http" if ca_cert is None else "https"
    context = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else None
    url = f"{scheme}://{coordinator}/health"
    started = time.monotonic()
    delay = 1.0
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5, context=context) as response:
                if response.status == 200:
                    return
                problem = f"HTTP {response.status}"
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise InputError(
                    f"ca_cert {ca_cert} does not verify the coordinator at {coordinator} "
                    f"({reason.verify_message}); ask the coordinator for its ca.crt"
                ) from None
            if isinstance(reason, ssl.SSLError):
                raise InputError(f"TLS with the coordinator at {coordinator} failed: {reason}") from None
            problem = str(reason)
        except (ConnectionError, TimeoutError) as exc:
            problem = str(exc) or type(exc).__name__
        waited = time.monotonic() - started
        if give_up_after is not None and waited + delay > give_up_after:
            raise InputError(
                f"coordinator {coordinator} unreachable after {waited:.0f} s ({problem}); check the "
                "address in the config and that its port is open"
            )
        on_retry(problem, delay)
        time.sleep(delay)
        delay = min(delay * 2, 30.0)


def start_supernode(
    *,
    coordinator: str,
    ca_cert: Path | None,
    runtime_port: int,
    site_spec: Path,
    home: Path,
    name: str = "SuperNode",
    allowed_apps: list[str] | None = None,
    torch_threads: int | None = None,
    extra_pythonpath: list[Path] | None = None,
    node_key: Path | None = None,
) -> ManagedProcess:
    """Start `flower-supernode` for one site; return once its runtime API is healthy.

    The SuperNode runs only app bundles whose SHA-256 is in `allowed_apps` (default: the
    fedglm app of this install), through the guarded `flwr-clientapp` of guard.py. With TLS
    it signs its requests with `node_key` (`fedglm/nodes.py`), when given.
    """
    if '"' in str(site_spec):
        raise InputError(f"state_dir {site_spec.parent}: a path with '\"' cannot be passed to Flower")
    check_version()  # the guard hooks into this Flower release's internals
    check_port_free("127.0.0.1", runtime_port, "runtime_port")
    argv = [
        executable("flower-supernode"),
        "--superlink",
        coordinator,
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),
        "--node-config",
        f'{SITE_KEY}="{site_spec}"',
    ]
    if ca_cert is None:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(ca_cert)]
        if node_key is not None:
            argv += ["--auth-supernode-private-key", str(node_key)]
    env = flower_env(home, extra_pythonpath)
    guard_bin = write_clientapp_shim(home / "guard-bin").parent
    env["PATH"] = str(guard_bin) + os.pathsep + env["PATH"]
    if torch_threads is not None:
        env["OMP_NUM_THREADS"] = str(torch_threads)
    env[ALLOWED_ENV] = ",".join(allowed_apps if allowed_apps is not None else [fab_sha256()])
    process = start(name, argv, env, home / "supernode.log")
    try:
        wait_healthy(process, f"http://127.0.0.1:{runtime_port}/health", ca_cert=None)
    except CheckFailed:
        process.stop()
        if node_refused(process):
            raise NodeRefused(refusal_message(coordinator, node_key)) from None
        raise
    except BaseException:
        process.stop()
        raise
    return process


REFUSED_MARK = "Failed to activate SuperNode"  # Flower's words when the SuperLink refuses a node key


class NodeRefused(InputError):
    """The coordinator's SuperLink refused this site's node key (not listed, or not yet registered)."""


def node_refused(node: ManagedProcess) -> bool:
    """True if the SuperNode's log records that the SuperLink refused its node key."""
    try:
        return REFUSED_MARK in node.log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def refusal_message(coordinator: str, node_key: Path | None) -> str:
    public = node_key.with_name(NODE_PUB) if node_key is not None else NODE_PUB
    return (
        f"the coordinator {coordinator} refused this site's node key: send {public} to the coordinator, "
        "who lists it under this site's name in coordinator.yaml (sites:) and restarts fedglm server"
    )
