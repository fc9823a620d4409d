"""Starting, watching and stopping the processes fedglm runs Flower in (`fedglm/processes.py`)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fedglm.errors import CheckFailed, InputError
from fedglm.processes import (
    ManagedProcess,
    check_port_free,
    executable,
    flower_env,
    free_port,
    start,
    wait_healthy,
)

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc; PDEATHSIG is Linux"
)


def _state(pid: int) -> str | None:
    """The process's state letter from /proc, or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for a reaper, but runs nothing)."""
    state = _state(pid)
    return state is not None and state not in ("Z", "X")


def _group(pgid: int) -> list[int]:
    """Every live process in process group `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def processes() -> Iterator[list[ManagedProcess]]:
    """Processes a test starts; stopped at the end whatever happened."""
    started: list[ManagedProcess] = []
    yield started
    for process in started:
        process.stop(timeout=1)


# --- flower_env ---------------------------------------------------------------------------------


def test_flower_env_puts_the_venv_first_and_composes_pythonpath(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("PYTHONPATH", "/already/there")
    monkeypatch.delenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", raising=False)
    home = tmp_path / "flwr-home"
    before = dict(os.environ)
    env = flower_env(home, [tmp_path / "a", tmp_path / "b"])

    assert env["PATH"] == str(Path(sys.executable).parent) + os.pathsep + "/usr/bin:/bin"
    assert env["FLWR_HOME"] == str(home) and home.is_dir()
    assert env["PYTHONPATH"] == os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b"), "/already/there"])
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert dict(os.environ) == before  # a copy: the caller's own environment is left as it was


def test_flower_env_without_extra_paths_keeps_pythonpath_as_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTHONPATH", raising=False)
    assert "PYTHONPATH" not in flower_env(tmp_path / "h1")
    assert flower_env(tmp_path / "h2", [tmp_path / "a"])["PYTHONPATH"] == str(tmp_path / "a")
    monkeypatch.setenv("PYTHONPATH", "/mine")
    assert flower_env(tmp_path / "h3")["PYTHONPATH"] == "/mine"


def test_flower_env_keeps_a_poll_interval_the_user_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", raising=False)
    assert flower_env(tmp_path / "a")["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.1"
    monkeypatch.setenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "2")
    assert flower_env(tmp_path / "b")["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "2"


# --- executable, ports --------------------------------------------------------------------------


def test_executable_finds_tools_next_to_this_python_or_names_the_missing_one() -> None:
    found = Path(executable(Path(sys.executable).name))
    assert found.parent == Path(sys.executable).parent and found.exists()
    with pytest.raises(InputError, match="no-such-flower-tool not found next to") as caught:
        executable("no-such-flower-tool")
    assert "pip install -e ." in str(caught.value)


def test_a_bound_port_is_reported_in_use_in_one_line() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(InputError, match=f"SuperLink 127.0.0.1:{port} is already in use") as caught:
            check_port_free("127.0.0.1", port, "SuperLink")
        assert "\n" not in str(caught.value)
    check_port_free("127.0.0.1", port, "SuperLink")  # released: free again


def test_free_port_gives_a_port_that_can_be_bound() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    check_port_free("127.0.0.1", port, "test")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


# --- start / stop -------------------------------------------------------------------------------


@linux_only
def test_stop_kills_the_whole_process_group_with_grandchildren(
    tmp_path: Path, processes: list[ManagedProcess]
) -> None:
    process = start("sleepers", ["sh", "-c", "sleep 300 & sleep 300"], dict(os.environ), tmp_path / "s.log")
    processes.append(process)
    assert _wait_for(lambda: len(_group(process.popen.pid)) >= 2), _group(process.popen.pid)
    members = _group(process.popen.pid)
    assert any(pid != process.popen.pid for pid in members)  # the background sleep: not our child
    assert process.alive()

    process.stop(timeout=5)

    assert not process.alive() and process.popen.returncode is not None
    assert _wait_for(lambda: not any(_running(pid) for pid in members)), [
        (pid, _state(pid)) for pid in members
    ]


@linux_only
def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(
    tmp_path: Path, processes: list[ManagedProcess]
) -> None:
    # `trap '' TERM` makes the shell and the sleeps it starts ignore SIGTERM.
    argv = ["sh", "-c", "trap '' TERM; sleep 300 & sleep 300"]
    process = start("stubborn", argv, dict(os.environ), tmp_path / "s.log")
    processes.append(process)
    assert _wait_for(lambda: len(_group(process.popen.pid)) >= 2)
    members = _group(process.popen.pid)

    began = time.monotonic()
    process.stop(timeout=0.5)

    assert process.popen.returncode == -signal.SIGKILL
    assert time.monotonic() - began < 5
    assert _wait_for(lambda: not any(_running(pid) for pid in members))


@linux_only
def test_a_started_process_dies_when_its_parent_is_killed(tmp_path: Path) -> None:
    parent_code = (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from fedglm.processes import start\n"
        "child = start('child', ['sleep', '300'], dict(os.environ), Path(sys.argv[1]))\n"
        "print(child.popen.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code, str(tmp_path / "child.log")], stdout=subprocess.PIPE, text=True
    )
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert _running(child)
        time.sleep(0.3)  # the parent is in its sleep: nothing else would end the child
        assert _running(child)

        parent.send_signal(signal.SIGKILL)  # no chance for the parent to clean up
        parent.wait(5)

        assert _wait_for(lambda: not _running(child)), f"child {child} outlived its parent: {_state(child)}"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(5)
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


# --- wait_healthy -------------------------------------------------------------------------------


def test_wait_healthy_reports_an_exited_process_with_its_log_tail(
    tmp_path: Path, processes: list[ManagedProcess]
) -> None:
    script = "echo one; echo; echo two; echo three; echo 'fatal: cannot bind'; exit 3"
    process = start("SuperLink", ["sh", "-c", script], dict(os.environ), tmp_path / "link.log")
    processes.append(process)
    url = f"http://127.0.0.1:{free_port()}/health"  # nothing listens there
    with pytest.raises(CheckFailed) as caught:
        wait_healthy(process, url, ca_cert=None, timeout=30)
    assert str(caught.value) == "SuperLink exited (code 3): two | three | fatal: cannot bind"


class _Health(BaseHTTPRequestHandler):
    status_code = 200

    def do_GET(self) -> None:
        self.send_response(self.status_code)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[ThreadingHTTPServer, type[_Health]]]:
    handler = type("Handler", (_Health,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()


def test_wait_healthy_returns_once_the_url_answers_200(
    tmp_path: Path,
    processes: list[ManagedProcess],
    health_server: tuple[ThreadingHTTPServer, type[_Health]],
) -> None:
    server, _ = health_server
    process = start("SuperNode", ["sleep", "300"], dict(os.environ), tmp_path / "node.log")
    processes.append(process)
    began = time.monotonic()
    wait_healthy(process, f"http://127.0.0.1:{server.server_address[1]}/health", ca_cert=None, timeout=20)
    assert time.monotonic() - began < 5


def test_wait_healthy_gives_up_after_its_timeout(
    tmp_path: Path,
    processes: list[ManagedProcess],
    health_server: tuple[ThreadingHTTPServer, type[_Health]],
) -> None:
    server, handler = health_server
    handler.status_code = 503
    process = start(
        "SuperNode", ["sh", "-c", "echo warming up; sleep 300"], dict(os.environ), tmp_path / "n.log"
    )
    processes.append(process)
    assert _wait_for(lambda: "warming up" in process.log_tail())
    with pytest.raises(CheckFailed, match=r"SuperNode did not become healthy within 1 s: warming up"):
        wait_healthy(process, f"http://127.0.0.1:{server.server_address[1]}/health", ca_cert=None, timeout=1)
