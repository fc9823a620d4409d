"""A killed and restarted `fedglm server` resumes from its last checkpoint (real processes)."""

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


def test_killed_server_resumes_from_checkpoint(tmp_path: Path, certs: CertPaths) -> None:
    port = free_port()
    out = tmp_path / "run"
    (tmp_path / "coordinator.yaml").write_text(
        f"host: 127.0.0.1\nport: {port}\nout_dir: run\n"
        f"tls: {{ca_cert: {certs.ca_cert}, server_cert: {certs.server_cert}, "
        f"server_key: {certs.server_key}}}\n"
        "federation:\n  rounds: 2\n  min_clients: 2\n"
        "  train: {local_steps: 5, batch_size: 8, seq_len: 64}\n"
    )
    data = write_generated_corpus(tmp_path / "data", sites=2, records_per_site=30, seed=0)
    for i, path in enumerate(data, start=1):
        (tmp_path / f"h{i}.yaml").write_text(
            f"site: h{i}\ncoordinator: 127.0.0.1:{port}\nca_cert: {certs.ca_cert}\n"
            f"runtime_port: {free_port()}\nstate_dir: state-{i}\n"
            f"data: {{path: {path}, field: text}}\n"
            "privacy: {sample_rate: 0.2, epsilon: 8.0}\n"
        )
        make_keys(tmp_path / f"state-{i}", "ledger")
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in ("server1", "server2", "h1", "h2")}

    def launch(args: list[str], log: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([*FEDGLM, *args], cwd=tmp_path, stdout=logs[log], stderr=subprocess.STDOUT)

    clients = [launch(["client", "--config", f"h{i}.yaml"], f"h{i}") for i in (1, 2)]
    try:
        first = launch(["server", "--config", "coordinator.yaml"], "server1")
        _wait_for(lambda: _rounds(out) == [1] or any(c.poll() is not None for c in clients), 240, "round 1")
        assert all(c.poll() is None for c in clients), (tmp_path / "h1.log").read_text()
        first.send_signal(signal.SIGKILL)  # no chance to clean up: its SuperLink must die with it
        first.wait(10)
        checkpoint = load_checkpoint(out)
        assert checkpoint is not None and checkpoint.round == 1
        _wait_for(lambda: _port_free(port), 30, "the old SuperLink to exit")

        second = launch(["server", "--config", "coordinator.yaml"], "server2")
        assert second.wait(300) == 0, (tmp_path / "server2.log").read_text()
    finally:
        for process in clients:
            process.send_signal(signal.SIGTERM)
        for process in clients:
            process.wait(30)

    assert _rounds(out) == [1, 2]
    assert "Resuming from the checkpoint of round 1" in (out / "serverapp.log").read_text()
    final = load_checkpoint(out)
    assert final is not None and final.round == 2
    assert all(p.returncode == 0 for p in clients), [p.returncode for p in clients]
    # both rounds are in each site's ledger, countersigned across the coordinator's restart
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
        assert [r["receipt"] for r in json.loads(audit.stdout)["rows"]] == ["ok", "ok"]


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0
