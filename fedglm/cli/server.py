"""`fedglm server`: the coordinator. Starts the SuperLink, runs the federation, stops cleanly."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedglm.cli.common import reports_errors
from fedglm.cli.progress import print_release, print_round, print_table, status, table_title
from fedglm.config import CoordinatorConfig, ListedSite, load_config
from fedglm.errors import InputError
from fedglm.layout import METRICS_NAME, RELEASE_DIR
from fedglm.models.base import open_federation_base
from fedglm.public_text import public_text
from fedglm.release import release
from fedglm.server.coordinator import admit_sites, execute_run, read_listed_keys, write_spec
from fedglm.server.public_eval import PublicEval
from fedglm.server.superlink import TLSFiles, check_insecure_allowed, start_superlink


@reports_errors
def server(
    config: Annotated[Path, typer.Option(help="Coordinator YAML (see server/coordinator.yaml).")],
    insecure: Annotated[
        bool, typer.Option(help="Run without TLS (refused unless host is a loopback address).")
    ] = False,
) -> None:
    """Start the SuperLink, submit the fedglm app, and follow it round by round."""
    cfg = load_config(config, CoordinatorConfig)
    tls = _tls(cfg, insecure, config)
    keys = read_listed_keys(_listed_sites(cfg, tls, config))
    fed = cfg.federation
    base, _ = open_federation_base(fed)  # a missing or unfit base, or bad adapters, fail now
    status(
        f"base model {base.folder}: {base.family.architecture}, {base.parameters:,} parameters, "
        f"hash {base.hash[:16]}..."
    )
    if fed.public_eval is not None:  # a missing or unreadable public text fails now, not in round 0
        status(
            f"public evaluation: {len(PublicEval.open(fed.public_eval, base, fed.train.seq_len).records)} "
            "held-out public records scored by the coordinator each round"
        )
    if cfg.release is not None:
        public_text(cfg.release.public_text)  # so does the release's
    superlink = start_superlink(
        host=cfg.host, port=cfg.port, tls=tls, home=cfg.out_dir / "flower" / "superlink", node_auth=bool(keys)
    )
    try:
        local = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
        ca_cert = tls.ca_cert if tls else None
        nodes = admit_sites(f"{local}:{cfg.port}", ca_cert, keys) if keys else None
        spec_path = write_spec(cfg.out_dir, fed, resume=cfg.resume, receipt_key=cfg.receipt_key, nodes=nodes)
        admitted = f"{len(keys)} listed hospital(s) admitted" if keys else "any hospital admitted (no TLS)"
        status(
            f"SuperLink listening on {cfg.host}:{cfg.port} ({'TLS' if tls else 'no TLS'}; {admitted}); "
            f"waiting for {fed.min_clients} hospital(s)"
        )
        rows = execute_run(
            superlink=superlink,
            address=f"{local}:{cfg.port}",
            ca_cert=ca_cert,
            spec_path=spec_path,
            out_dir=cfg.out_dir,
            on_row=lambda row: print_round(row, fed.rounds),
        )
    finally:
        superlink.stop()
    print_table(rows, title=table_title("fedglm server", rows, cfg.out_dir / METRICS_NAME))
    if cfg.release is not None:
        status("distilling and exporting the final model (release section)")
        release(cfg.out_dir, cfg.release)
        print_release(cfg.out_dir / RELEASE_DIR)


def _tls(cfg: CoordinatorConfig, insecure: bool, path: Path) -> TLSFiles | None:
    if insecure:
        if cfg.tls is not None:
            raise InputError(f"{path} has a tls section but --insecure was given; drop one of them")
        check_insecure_allowed(cfg.host, "host")
        return None
    if cfg.tls is None:
        raise InputError(
            f"{path} has no tls section: make certificates with `fedglm certs` and add them, "
            "or pass --insecure (loopback only)"
        )
    return TLSFiles(ca_cert=cfg.tls.ca_cert, server_cert=cfg.tls.server_cert, server_key=cfg.tls.server_key)


def _listed_sites(cfg: CoordinatorConfig, tls: TLSFiles | None, path: Path) -> list[ListedSite]:
    if tls is None:
        if cfg.sites:
            raise InputError(
                f"{path} lists sites, which needs TLS (SuperNode authentication); drop --insecure"
            )
        return []
    if not cfg.sites:
        raise InputError(
            f"{path} has no sites list: add each hospital's name and node_key (its node.pub, from "
            "`fedglm keys --node` or its first `fedglm client`), so only they can connect"
        )
    return cfg.sites
