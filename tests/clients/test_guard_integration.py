"""A guarded SuperNode runs fedglm's own app bundle and refuses any other (real Flower).

The coordinator here is told to accept the rogue bundle (as a compromised coordinator would):
the site must refuse it on its own.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from fedglm.app_bundle import FAB_DIR
from fedglm.certs import CertPaths
from fedglm.clients.supernode import start_supernode
from fedglm.processes import ManagedProcess, free_port
from fedglm.server.submit import ControlClient
from fedglm.server.superlink import TLSFiles, start_superlink
from tests.conftest import ROOT

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(tmp_path: Path, certs: CertPaths) -> Iterator[tuple[str, Path]]:
    tls = TLSFiles(certs.ca_cert, certs.server_cert, certs.server_key)
    port = free_port()
    processes: list[ManagedProcess] = []
    try:
        # ROOT on PYTHONPATH everywhere: without the guard, the rogue ClientApp WOULD import and run.
        processes.append(
            start_superlink(
                host="127.0.0.1",
                port=port,
                tls=tls,
                home=tmp_path / "link",
                extra_pythonpath=[ROOT],
                allowed_apps=[
                    hashlib.sha256(build_fab_from_disk(ROOT / "tests" / "assets" / "rogue_app")).hexdigest()
                ],
            )
        )
        spec = tmp_path / "site.json"
        spec.write_text("{}")
        processes.append(
            start_supernode(
                coordinator=f"127.0.0.1:{port}",
                ca_cert=certs.ca_cert,
                runtime_port=free_port(),
                site_spec=spec,
                home=tmp_path / "node",
                extra_pythonpath=[ROOT],
            )
        )
        yield f"127.0.0.1:{port}", certs.ca_cert
    finally:
        for process in reversed(processes):
            process.stop()


def test_rogue_app_bundle_is_refused_before_any_of_its_code_runs(
    stack: tuple[str, Path], tmp_path: Path
) -> None:
    address, ca_cert = stack
    rogue = build_fab_from_disk(ROOT / "tests" / "assets" / "rogue_app")
    assert rogue != build_fab_from_disk(FAB_DIR)  # same name and version, other code
    marker = tmp_path / "rogue-ran"
    client = ControlClient(address, ca_cert)
    try:
        run_id = client.start_run(rogue, {"marker": str(marker)})
        deadline = time.monotonic() + 150
        while client.status(run_id)[0] != "finished" and time.monotonic() < deadline:
            time.sleep(0.5)
        status = client.status(run_id)
    finally:
        client.close()

    assert status[:2] == ("finished", "completed"), status
    server_saw = Path(str(marker) + ".server").read_text()
    assert "refused app bundle" in server_saw
    assert not marker.exists(), "the rogue ClientApp ran on the site"
