"""The coordinator's job: start the SuperLink, submit the fedglm app, follow it, stop cleanly.

Shared by `fedglm server` (one SuperLink, hospitals connect from afar) and `fedglm simulate`
(which also starts the SuperNodes on loopback). Progress comes from the run folder's
`metrics.jsonl`, which the ServerApp appends after each round; the ServerApp's own log is
streamed to `serverapp.log` in the run folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedglm import metrics
from fedglm.app_bundle import fab_bytes
from fedglm.atomic import atomic_write_text
from fedglm.config import FederationConfig, ListedSite, RunSpec
from fedglm.errors import CheckFailed, InputError
from fedglm.layout import RECEIPT_KEY_NAME, SERVERAPP_LOG, SPEC_KEY, SPEC_NAME
from fedglm.nodes import read_node_public_key
from fedglm.privacy.keys import make_keys
from fedglm.processes import ManagedProcess
from fedglm.server.submit import ControlClient, follow_run

RowCallback = Callable[[dict[str, Any]], None]


def read_listed_keys(sites: list[ListedSite]) -> dict[str, bytes]:
    """Each listed hospital's node public key (checked now, before anything starts)."""
    keys: dict[str, bytes] = {}
    for site in sites:
        key = read_node_public_key(site.node_key, f"sites: {site.name}: node_key")
        twin = next((name for name, other in keys.items() if other == key), None)
        if twin is not None:
            raise InputError(f"sites: {site.name} and {twin} list the same node key; one hospital, one name")
        keys[site.name] = key
    return keys


def admit_sites(address: str, ca_cert: Path | None, keys: dict[str, bytes]) -> dict[int, str]:
    """Register each listed node key with the SuperLink; node id -> site name."""
    client = ControlClient(address, ca_cert)
    try:
        return {client.register_node(key, name): name for name, key in keys.items()}
    finally:
        client.close()


def write_spec(
    out_dir: Path,
    federation: FederationConfig,
    *,
    resume: bool,
    receipt_key: Path | None = None,
    nodes: dict[int, str] | None = None,
) -> Path:
    """The run's spec; the coordinator's receipt key (default `<out_dir>/receipt.key`) is made
    on first use, with its public half `receipt.pub` beside it for auditors."""
    out_dir.mkdir(parents=True, exist_ok=True)
    receipt_key = receipt_key or out_dir / f"{RECEIPT_KEY_NAME}.key"
    if not receipt_key.exists():
        make_keys(receipt_key.parent, receipt_key.stem)
    spec = RunSpec(
        federation=federation, out_dir=out_dir, resume=resume, receipt_key=receipt_key, nodes=nodes
    )
    path = out_dir / SPEC_NAME
    atomic_write_text(path, spec.model_dump_json(indent=2) + "\n")
    return path


def execute_run(
    *,
    superlink: ManagedProcess,
    address: str,
    ca_cert: Path | None,
    spec_path: Path,
    out_dir: Path,
    on_row: RowCallback,
    processes: list[ManagedProcess] | None = None,
) -> list[dict[str, Any]]:
    """Submit the fedglm app, report each finished round, return all rows; raise if it fails."""
    watched = [superlink, *(processes or [])]
    client = ControlClient(address, ca_cert)
    try:
        run_id = client.start_run(fab_bytes(), {SPEC_KEY: str(spec_path)})
        client.stream_logs(run_id, out_dir / SERVERAPP_LOG)
        seen = {int(r["round"]) for r in metrics.read_rows(out_dir)}

        def report_new_rows() -> None:
            for row in metrics.read_rows(out_dir):
                if int(row["round"]) not in seen:
                    seen.add(int(row["round"]))
                    on_row(row)

        def all_alive() -> bool:
            dead = [p for p in watched if not p.alive()]
            if dead:
                raise CheckFailed(f"{dead[0].name} exited unexpectedly: {dead[0].log_tail()}")
            return True

        outcome = follow_run(client, run_id, on_tick=report_new_rows, alive=all_alive)
        report_new_rows()
    finally:
        client.close()
    if not outcome.succeeded:
        reason = outcome.details or outcome.sub_status
        raise CheckFailed(f"run {run_id} {outcome.sub_status}: {reason} (see {out_dir / 'serverapp.log'})")
    return metrics.read_rows(out_dir)
