"""`fedglm client`: a hospital joins the federation. Its records never leave this machine."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from fedglm.atomic import atomic_write_text
from fedglm.certs import check_certificate_file
from fedglm.cli.common import reports_errors
from fedglm.cli.progress import status
from fedglm.clients.site import SITE_NAME, describe_site_data
from fedglm.clients.supernode import NodeRefused, node_refused, preflight, refusal_message, start_supernode
from fedglm.config import HospitalConfig, load_config
from fedglm.errors import CheckFailed, InputError
from fedglm.models.base import BaseModel
from fedglm.nodes import NODE_KEY, NODE_PUB, ensure_node_keys
from fedglm.privacy.site import describe_site_privacy
from fedglm.processes import check_port_free
from fedglm.server.superlink import check_insecure_allowed

QUICK_EXIT_S = 15.0
MAX_QUICK_FAILURES = 3
REFUSED_WAIT_S = 5.0  # a restarting coordinator lists its sites seconds after its SuperLink answers


@reports_errors
def client(
    config: Annotated[Path, typer.Option(help="Hospital YAML (see clients/hospital.yaml).")],
    insecure: Annotated[
        bool, typer.Option(help="Connect without TLS (refused unless the coordinator is loopback).")
    ] = False,
    give_up_after: Annotated[
        float | None,
        typer.Option(help="Stop retrying an unreachable coordinator after this many seconds."),
    ] = None,
) -> None:
    """Check the site's data and the coordinator, then run a SuperNode until Ctrl-C."""
    cfg = load_config(config, HospitalConfig)
    ca_cert = _ca_cert(cfg, insecure, config)
    check_port_free("127.0.0.1", cfg.runtime_port, "runtime_port")
    status(describe_site_data(cfg.site_spec()))  # bad data or a delta too large fail here, first
    status(_describe_base(cfg.base))  # so does a base folder that is refused or damaged
    if cfg.privacy.enabled:  # so do a missing signing key and a damaged ledger
        status(describe_site_privacy(cfg.site_spec()))
    node_key = _node_key(cfg, config) if ca_cert is not None else None
    spec_path = cfg.state_dir / SITE_NAME
    atomic_write_text(spec_path, cfg.site_spec().model_dump_json(indent=2) + "\n")

    def retrying(problem: str, delay: float) -> None:
        status(f"coordinator {cfg.coordinator} unreachable ({problem}); retrying in {delay:.0f} s")

    quick_failures = 0
    try:
        while True:  # a coordinator restart ends the SuperNode: reconnect, as often as needed
            preflight(cfg.coordinator, ca_cert, give_up_after=give_up_after, on_retry=retrying)
            try:
                node = start_supernode(
                    coordinator=cfg.coordinator,
                    ca_cert=ca_cert,
                    runtime_port=cfg.runtime_port,
                    site_spec=spec_path,
                    home=cfg.state_dir / "flower",
                    node_key=node_key,
                )
            except NodeRefused:  # also while a restarting coordinator has not yet listed its sites
                quick_failures += 1
                if quick_failures >= MAX_QUICK_FAILURES:
                    raise
                status(
                    f"{cfg.site}: the coordinator refused this node's key; retrying in {REFUSED_WAIT_S:.0f} s"
                )
                time.sleep(REFUSED_WAIT_S)
                continue
            status(
                f"{cfg.site}: connected to {cfg.coordinator}; training when the coordinator "
                f"asks (log: {node.log_path}); Ctrl-C to leave"
            )
            started = time.monotonic()
            try:
                while node.alive():
                    time.sleep(1.0)
            finally:
                node.stop()
            crashed = node.popen.returncode != 0 and time.monotonic() - started < QUICK_EXIT_S
            quick_failures = quick_failures + 1 if crashed else 0
            if quick_failures >= MAX_QUICK_FAILURES:
                if node_refused(node):
                    raise NodeRefused(refusal_message(cfg.coordinator, node_key))
                raise CheckFailed(
                    f"the SuperNode failed {quick_failures} times in a row within seconds of starting: "
                    f"{node.log_tail()} (log: {node.log_path})"
                )
            status(
                f"{cfg.site}: the SuperNode stopped (code {node.popen.returncode}): "
                f"{node.log_tail(1)}; reconnecting"
            )
    except KeyboardInterrupt:
        status(f"{cfg.site}: leaving the federation")


def _describe_base(folder: Path) -> str:
    base = BaseModel.open(folder)
    return (
        f"base model {folder}: {base.family.architecture}, {base.parameters:,} parameters, hash "
        f"{base.hash[:16]}... (the coordinator must announce this hash, or this site refuses its rounds)"
    )


def _ca_cert(cfg: HospitalConfig, insecure: bool, path: Path) -> Path | None:
    host = cfg.coordinator.rsplit(":", 1)[0]
    if insecure:
        if cfg.ca_cert is not None:
            raise InputError(f"{path} sets ca_cert but --insecure was given; drop one of them")
        check_insecure_allowed(host, "coordinator")
        return None
    if cfg.ca_cert is None:
        raise InputError(f"{path}: set ca_cert to the coordinator's ca.crt (or --insecure on loopback)")
    check_certificate_file(cfg.ca_cert, "ca_cert")
    return cfg.ca_cert


def _node_key(cfg: HospitalConfig, path: Path) -> Path:
    """The SuperNode's private key: the configured one, or `<state_dir>/node.key` (made once)."""
    if cfg.node_key is not None:
        if not cfg.node_key.is_file():
            raise InputError(
                f"{path}: node_key {cfg.node_key} does not exist; make one with `fedglm keys --node`"
            )
        return cfg.node_key
    made = not (cfg.state_dir / NODE_KEY).exists()
    key = ensure_node_keys(cfg.state_dir)
    public = cfg.state_dir / NODE_PUB
    status(
        f"{cfg.site}: node key {key}"
        + (
            f" made; send {public} to the coordinator to be listed"
            if made
            else f" (coordinator lists {public})"
        )
    )
    return key
