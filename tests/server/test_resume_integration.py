"""`kill -9` of `fedglm server` mid-round: no Flower process outlives it, and the restarted
server resumes from its last checkpoint with no round spent twice in any ledger (real processes)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedglm.certs import CertPaths
from fedglm.corpus import write_generated_corpus
from fedglm.nodes import make_node_keys
from fedglm.privacy.keys import make_keys
from fedglm.processes import free_port
from fedglm.server.checkpoint import load_checkpoint

pytestmark = pytest.mark.integration
FEDGLM = [sys.executable, "-m", "fedglm"]


def _wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _rounds(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["round"] for line in path.read_text().splitlines() if line.strip()]


def test_killed_server_resumes_from_checkpoint(tmp_path: Path, certs: CertPaths, tiny_base: Path) -> None:
    port = free_port()
    out = tmp_path / "run"
    (tmp_path / "coordinator.yaml").write_text(
        f"host: 127.0.0.1\nport: {port}\nout_dir: run\n"
        f"tls: {{ca_cert: {certs.ca_cert}, server_cert: {certs.server_cert}, "
        f"server_key: {certs.server_key}}}\n"
        "sites:\n  - {name: h1, node_key: state-1/node.pub}\n  - {name: h2, node_key: state-2/node.pub}\n"
        f"federation:\n  base: {tiny_base}\n  rounds: 2\n  min_clients: 2\n"
        "  train: {local_steps: 5, batch_size: 8, seq_len: 64}\n"
    )
    data = write_generated_corpus(tmp_path / "data", sites=2, records_per_site=30, seed=0)
    for i, path in enumerate(data, start=1):
        (tmp_path / f"h{i}.yaml").write_text(
            f"site: h{i}\ncoordinator: 127.0.0.1:{port}\nca_cert: {certs.ca_cert}\n"
            f"runtime_port: {free_port()}\nstate_dir: state-{i}\nbase: {tiny_base}\n"
            f"data: {{path: {path}, field: text}}\n"
            "privacy: {sample_rate: 0.2, epsilon: 8.0}\n"
        )
        make_keys(tmp_path / f"state-{i}", "ledger")
        make_node_keys(tmp_path / f"state-{i}")  # node.pub: what the hospital sends the coordinator
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in ("server1", "server2", "h1", "h2")}

    def launch(args: list[str], log: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([*FEDGLM, *args], cwd=tmp_path, stdout=logs[log], stderr=subprocess.STDOUT)

    clients = [launch(["client", "--config", f"h{i}.yaml"], f"h{i}") for i in (1, 2)]
    servers: list[subprocess.Popen[bytes]] = []
    try:
        first = launch(["server", "--config", "coordinator.yaml"], "server1")
        servers.append(first)
        # Mid-round 2: a site has spent its budget on round 2, the coordinator has not finished it
        # (after round 0, the evaluation of the base, and round 1). The waits are long because a
        # loaded 2-core machine takes minutes a round; on a quiet one they end in about one.
        _wait_for(
            lambda: any(("update", 2) in _entries(tmp_path / f"state-{i}") for i in (1, 2)),
            900,
            "round 2 spent",
        )
        tree = _descendants(first.pid)
        assert any("serverapp" in command for command in tree.values()), tree
        first.send_signal(signal.SIGKILL)  # no chance to clean up: its Flower processes must die with it
        first.wait(10)
        _wait_for(lambda: not any(_alive(pid) for pid in tree), 10, f"no Flower process left of {tree}")
        checkpoint = load_checkpoint(out)
        assert checkpoint is not None and checkpoint.round in (1, 2)
        _wait_for(lambda: _port_free(port), 30, "the old SuperLink's port")

        second = launch(["server", "--config", "coordinator.yaml"], "server2")
        servers.append(second)
        assert second.wait(600) == 0, (tmp_path / "server2.log").read_text()
    finally:
        # A failed wait leaves a server running: stop it, with its Flower processes, and the sites.
        running = [process for process in [*servers, *clients] if process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        for process in running:
            process.wait(60)

    assert _rounds(out) == [0, 1, 2]  # round 0: the base evaluated once, kept across the restart
    assert f"Resuming from the checkpoint of round {checkpoint.round}" in (out / "serverapp.log").read_text()
    for i in (1, 2):  # each round, and each evaluation's metrics, spent once at each site
        assert _entries(tmp_path / f"state-{i}") == [
            ("metrics", 0),
            ("update", 1),
            ("metrics", 1),
            ("update", 2),
            ("metrics", 2),
        ]
    final = load_checkpoint(out)
    assert final is not None and final.round == 2
    assert all(p.returncode == 0 for p in clients), [p.returncode for p in clients]
    # every line is in each site's ledger, countersigned across the coordinator's restart
    for i in (1, 2):
        audit = subprocess.run(
            [
                *FEDGLM,
                "audit",
                f"state-{i}/privacy/ledger.jsonl",
                "--public-key",
                f"state-{i}/ledger.pub",
                "--server-key",
                "run/receipt.pub",
                "--receipts",
                f"run/receipts/h{i}.jsonl",
                "--json",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert audit.returncode == 0, audit.stderr
        assert [r["receipt"] for r in json.loads(audit.stdout)["rows"]] == ["ok"] * 5


def _entries(state_dir: Path) -> list[tuple[str, int]]:
    """(release, round) of each line of the site's ledger."""
    ledger = state_dir / "privacy" / "ledger.jsonl"
    lines = ledger.read_text().splitlines() if ledger.exists() else []
    entries = [json.loads(line)["entry"] for line in lines if line.endswith("}")]
    return [(entry["release"], entry["round"]) for entry in entries]


def _descendants(root: int) -> dict[int, str]:
    """Every process under `root` (from /proc), with its command line."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = _command(pid)
                frontier.append(pid)
    return found


def _command(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper has stopped)."""
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0
