"""Starting Flower's SuperLink for the coordinator: TLS by default, its own FLWR_HOME, guarded.

The SuperLink serves the Fleet API (SuperNodes), the Control API (run submission) and the
runtime API on one port. It runs through `fedglm.server.guard.superlink_main`: only the Fleet
API answers from afar, only fedglm's own app bundle runs, and every Flower process dies with
its parent (see guard.py). Runtime dependency installation is always off: the ServerApp runs
from the coordinator's installed fedglm, nothing is fetched at run time.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from fedglm.app_bundle import ALLOWED_ENV, fab_sha256
from fedglm.certs import check_certificate_file
from fedglm.errors import InputError
from fedglm.flower import check_version
from fedglm.processes import (
    ManagedProcess,
    check_port_free,
    executable,
    flower_env,
    start,
    wait_healthy,
)
from fedglm.server.guard import is_loopback, write_coordinator_shims


@dataclass(frozen=True)
class TLSFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def check_insecure_allowed(host: str, what: str) -> None:
    if not is_loopback(host):
        raise InputError(
            f"{what} {host}: running without TLS is only allowed on a loopback address "
            "(127.0.0.1); set up TLS with `fedglm certs`"
        )


def start_superlink(
    *,
    host: str,
    port: int,
    tls: TLSFiles | None,
    home: Path,
    extra_pythonpath: list[Path] | None = None,
    allowed_apps: list[str] | None = None,
    node_auth: bool = False,
    health_timeout: float = 60.0,
) -> ManagedProcess:
    """Start the guarded `flower-superlink` and return once it answers on /health.

    Runs only app bundles whose SHA-256 is in `allowed_apps` (default: the fedglm app of this
    install). With `node_auth` only SuperNodes whose keys are registered connect (TLS needed;
    see `fedglm/nodes.py`).
    """
    check_version()  # the guards hook into this Flower release's internals
    executable("flower-superexec")  # the guard's shim hands over to it
    argv = [
        sys.executable,
        "-c",
        "from fedglm.server.guard import superlink_main; superlink_main()",
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    if tls is None:
        check_insecure_allowed(host, "SuperLink host")
        if node_auth:
            raise InputError("SuperNode authentication needs TLS: set up TLS with `fedglm certs`")
        argv.append("--insecure")
    else:
        check_certificate_file(tls.ca_cert, "tls.ca_cert")
        check_certificate_file(tls.server_cert, "tls.server_cert")
        if not tls.server_key.is_file():
            raise InputError(f"tls.server_key {tls.server_key} does not exist")
        argv += ["--enable-supernode-auth"] if node_auth else []
        argv += [
            "--ssl-ca-certfile",
            str(tls.ca_cert),
            "--ssl-certfile",
            str(tls.server_cert),
            "--ssl-keyfile",
            str(tls.server_key),
        ]
    check_port_free(host, port, "SuperLink port")
    env = flower_env(home, extra_pythonpath)
    env["PATH"] = str(write_coordinator_shims(home / "guard-bin")) + os.pathsep + env["PATH"]
    env[ALLOWED_ENV] = ",".join(allowed_apps if allowed_apps is not None else [fab_sha256()])
    process = start("SuperLink", argv, env, home / "superlink.log")
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    scheme = "https" if tls else "http"
    try:
        wait_healthy(
            process,
            f"{scheme}://{probe_host}:{port}/health",
            ca_cert=tls.ca_cert if tls else None,
            timeout=health_timeout,
        )
    except BaseException:
        process.stop()
        raise
    return process
