"""`fedglm certs`: make the federation's CA and the coordinator's TLS certificate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedglm.certs import make_certificates
from fedglm.cli.common import reports_errors


@reports_errors
def certs(
    out: Annotated[Path, typer.Option(help="Folder for ca.crt, ca.key, server.pem, server.key.")],
    host: Annotated[
        list[str],
        typer.Option(help="IP address or DNS name the coordinator is reached at (repeatable)."),
    ],
    days: Annotated[int, typer.Option(help="Validity in days.")] = 365,
    force: Annotated[bool, typer.Option(help="Overwrite existing files.")] = False,
) -> None:
    """Make a certificate authority and a server certificate for `fedglm server`."""
    paths = make_certificates(out, hosts=host, days=days, overwrite=force)
    typer.echo(
        f"wrote {paths.ca_cert} (give to every hospital), {paths.server_cert}, "
        f"{paths.server_key} and {paths.ca_key} (keep private)"
    )
