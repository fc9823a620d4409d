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
from fedglm.errors import CheckFailed
from fedglm.nodes import NODE_KEY, NODE_PUB, make_node_keys, read_node_public_key
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


def test_only_listed_supernodes_connect(tmp_path: Path, certs: CertPaths) -> None:
    """A SuperNode whose key the coordinator did not list cannot join, under any name."""
    port = free_port()
    tls = TLSFiles(certs.ca_cert, certs.server_cert, certs.server_key)
    make_node_keys(tmp_path / "listed")
    make_node_keys(tmp_path / "rogue")
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
        for who in ("rogue", "listed"):
            processes.append(
                start_supernode(
                    coordinator=f"127.0.0.1:{port}",
                    ca_cert=certs.ca_cert,
                    runtime_port=free_port(),
                    site_spec=spec,
                    home=tmp_path / f"node-{who}",
                    node_key=tmp_path / who / NODE_KEY,
                )
            )
        rogue, listed = processes[1:]
        [node_id] = nodes
        joined = f"SuperNode ID: {node_id}"
        deadline = time.monotonic() + 60
        while (rogue.alive() or joined not in listed.log_path.read_text()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not rogue.alive() and "[code: 2004] Failed to activate SuperNode" in rogue.log_path.read_text()
        assert listed.alive() and joined in listed.log_path.read_text()
    finally:
        for process in reversed(processes):
            process.stop()
