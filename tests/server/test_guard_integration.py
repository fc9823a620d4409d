"""A foreign app submitted to a running coordinator is refused and never executed, and an
unlisted SuperNode cannot connect (real Flower).

The coordinator's SuperLink listens on every interface, as for hospitals. From afar (the
machine's own non-loopback address, when it has one) the Control and runtime APIs answer 403;
from the coordinator's machine itself the submission is refused by content. Either way no run
exists afterwards and the app's code never ran.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.proto.control_pb2 import ListRunsRequest

from fedglm.certs import CertPaths
from fedglm.clients.supernode import start_supernode
from fedglm.corpus import write_generated_corpus
from fedglm.errors import CheckFailed
from fedglm.nodes import NODE_KEY, NODE_PUB, make_node_keys, read_node_public_key
from fedglm.privacy.keys import make_keys
from fedglm.processes import ManagedProcess, free_port
from fedglm.server.coordinator import admit_sites
from fedglm.server.submit import ControlClient
from fedglm.server.superlink import TLSFiles, start_superlink
from tests.conftest import ROOT

pytestmark = pytest.mark.integration


@pytest.fixture
def coordinator(tmp_path: Path, certs: CertPaths) -> Iterator[int]:
    port = free_port("0.0.0.0")
    process: ManagedProcess = start_superlink(
        host="0.0.0.0",
        port=port,
        tls=TLSFiles(certs.ca_cert, certs.server_cert, certs.server_key),
        home=tmp_path / "link",
        extra_pythonpath=[ROOT],  # the rogue app's code is importable: only the guard stops it
    )
    try:
        yield port
    finally:
        process.stop()


def _outward_address() -> str | None:
    """This machine's address on its outward interface, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 1))
            address = str(sock.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") else address


def _post(url: str, body: bytes, ca_cert: Path) -> int:
    context = ssl.create_default_context(cafile=str(ca_cert))
    context.check_hostname = False  # the certificate names 127.0.0.1; the chain is what matters here
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/protobuf"})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_a_foreign_app_is_refused_and_never_runs(coordinator: int, certs: CertPaths, tmp_path: Path) -> None:
    rogue = build_fab_from_disk(ROOT / "tests" / "assets" / "rogue_app")
    marker = tmp_path / "rogue-ran"

    outward = _outward_address()
    if outward is not None:  # from afar: not even parsed
        for path in ("/v1/control/start-run", "/v1/control/list-runs", "/v1/runtime/pull-task-input"):
            assert _post(f"https://{outward}:{coordinator}{path}", b"", certs.ca_cert) == 403, path
        assert _post(f"https://{outward}:{coordinator}/v1/fleet/get-run", b"", certs.ca_cert) != 403

    client = ControlClient(f"127.0.0.1:{coordinator}", certs.ca_cert)
    try:
        with pytest.raises(CheckFailed, match="refused app bundle sha256="):
            client.start_run(rogue, {"marker": str(marker)})
        time.sleep(3)  # what a run, had one been made, would need to start its ServerApp
        runs = client._client.ListRuns(ListRunsRequest()).run_dict
    finally:
        client.close()
    assert dict(runs) == {}
    assert not marker.exists() and not Path(str(marker) + ".server").exists()


def test_only_listed_supernodes_connect(tmp_path: Path, certs: CertPaths, tiny_base: Path) -> None:
    """A hospital whose node key the coordinator did not list cannot join, under any name:
    `fedglm client` ends with exit 2 and says what to send the coordinator; a listed node joins."""
    port = free_port()
    tls = TLSFiles(certs.ca_cert, certs.server_cert, certs.server_key)
    make_node_keys(tmp_path / "listed")
    data = write_generated_corpus(tmp_path / "data", sites=1, records_per_site=20, seed=0)
    (tmp_path / "rogue.yaml").write_text(
        f"site: h1\ncoordinator: 127.0.0.1:{port}\nca_cert: {certs.ca_cert}\n"
        f"runtime_port: {free_port()}\nstate_dir: rogue\ndata: {{path: {data[0]}, field: text}}\n"
        f"base: {tiny_base}\n"
        "privacy: {sample_rate: 0.2, epsilon: 8.0}\n"
    )
    make_keys(tmp_path / "rogue", "ledger")
    spec = tmp_path / "site.json"
    spec.write_text("{}")
    processes: list[ManagedProcess] = []
    try:
        processes.append(
            start_superlink(host="127.0.0.1", port=port, tls=tls, home=tmp_path / "link", node_auth=True)
        )
        nodes = admit_sites(
            f"127.0.0.1:{port}",
            certs.ca_cert,
            {"h1": read_node_public_key(tmp_path / "listed" / NODE_PUB, "key")},
        )
        rogue = subprocess.run(
            [sys.executable, "-m", "fedglm", "client", "--config", "rogue.yaml"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert rogue.returncode == 2, rogue.stderr
        assert (
            "refused this site's node key: send " in rogue.stderr and "/rogue/node.pub to the" in rogue.stderr
        )
        assert (
            "[code: 2004] Failed to activate SuperNode"
            in (tmp_path / "rogue/flower/supernode.log").read_text()
        )
        listed = start_supernode(
            coordinator=f"127.0.0.1:{port}",
            ca_cert=certs.ca_cert,
            runtime_port=free_port(),
            site_spec=spec,
            home=tmp_path / "node-listed",
            node_key=tmp_path / "listed" / NODE_KEY,
        )
        processes.append(listed)
        [node_id] = nodes
        joined = f"SuperNode ID: {node_id}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and joined not in listed.log_path.read_text():
            time.sleep(0.5)
        assert listed.alive() and joined in listed.log_path.read_text()
    finally:
        for process in reversed(processes):
            process.stop()
