"""Starting, watching and stopping Flower's own processes (SuperLink, SuperNode).

Each process runs in its own session (so it and the children Flower starts under it can be
stopped together) and dies with the fedglm process that started it (`die_with_parent`), with
its own `FLWR_HOME`, its output in a log file, and the venv's `bin` first on PATH (Flower finds
`flower-superexec`, `flwr-serverapp`, `flwr-clientapp` there; fedglm's guarded shims of them
come first, see `fedglm/app_bundle.py`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from fedglm.errors import CheckFailed, InputError

PR_SET_PDEATHSIG = 1

# Flower's superexec polls for new tasks every second by default; 0.1 s saves about a second
# a round on loopback at negligible cost.
TASK_POLL_INTERVAL_S = "0.1"


def flower_env(flwr_home: Path, extra_pythonpath: list[Path] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", TASK_POLL_INTERVAL_S)
    env["PYTHONUNBUFFERED"] = "1"
    if extra_pythonpath:
        parts = [str(p) for p in extra_pythonpath]
        if env.get("PYTHONPATH"):
            parts.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(parts)
    flwr_home.mkdir(parents=True, exist_ok=True)
    return env


def executable(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise InputError(f"{name} not found next to {sys.executable}; reinstall fedglm (pip install -e .)")
    return str(path)


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    _log: object = field(repr=False, default=None)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        useful = [line.strip() for line in text.splitlines() if line.strip()]
        return " | ".join(useful[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the whole process group, then SIGKILL what is left after `timeout`."""
        if self.popen.poll() is None:
            _signal_group(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        # Children (superexec, server/client apps) share the group: make sure none survive.
        _signal_group(self.popen.pid, signal.SIGKILL)
        close = getattr(self._log, "close", None)
        if close is not None:
            close()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies, even by SIGKILL (Linux).

    Called in every process fedglm starts or that Flower starts for it (SuperLink, SuperNode,
    SuperExec, ServerApp, ClientApp), so killing `fedglm server`, `client` or `simulate` takes
    the whole tree down at once: no orphan keeps training and spending a site's budget.
    """
    if sys.platform != "linux":
        return
    parent = os.getppid()
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request: the signal would never come
        os._exit(1)


def start(name: str, argv: list[str], env: dict[str, str], log_path: Path) -> ManagedProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")
    popen = subprocess.Popen(
        argv,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    return ManagedProcess(name=name, popen=popen, log_path=log_path, _log=log)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def check_port_free(host: str, port: int, what: str) -> None:
    """Fail with one line if `host:port` is already taken by another program."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like the servers themselves: connections in TIME_WAIT from an earlier run don't count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise InputError(
                f"{what} {host}:{port} is already in use (another fedglm or Flower process?); "
                "choose another port"
            ) from None


def wait_healthy(process: ManagedProcess, url: str, *, ca_cert: Path | None, timeout: float = 60.0) -> None:
    """Poll `url` until it answers 200; fail with the log's last lines if the process dies."""
    context = None
    if ca_cert is not None:
        context = ssl.create_default_context(cafile=str(ca_cert))
        context.check_hostname = False  # the chain is verified; the probe may use 127.0.0.1
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            raise CheckFailed(
                f"{process.name} exited (code {process.popen.returncode}): {process.log_tail()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError):
            pass
        time.sleep(0.25)
    raise CheckFailed(f"{process.name} did not become healthy within {timeout:.0f} s: {process.log_tail()}")
