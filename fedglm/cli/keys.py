"""`fedglm keys`: make the Ed25519 key pair that signs a site's ledger (or the coordinator's
receipts), or with `--node` the SuperNode key pair the coordinator lists (`fedglm/nodes.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedglm.cli.common import reports_errors
from fedglm.cli.progress import status
from fedglm.nodes import make_node_keys
from fedglm.privacy.keys import key_id, load_private_key, make_keys


@reports_errors
def keys(
    out: Annotated[Path, typer.Option(help="Folder for NAME.key (private, 0600) and NAME.pub.")],
    name: Annotated[
        str, typer.Option(help="File name stem: 'ledger' for a site, 'receipt' for the coordinator.")
    ] = "ledger",
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing key (its ledger can no longer be extended).")
    ] = False,
    node: Annotated[
        bool,
        typer.Option(
            help="Make the SuperNode key pair instead: node.key stays, node.pub goes to the coordinator."
        ),
    ] = False,
) -> None:
    """Make a signing key pair. Keep NAME.key at the site; give NAME.pub to the auditor."""
    if node:
        private_node, public_node = make_node_keys(out, overwrite=overwrite)
        status(f"private node key {private_node} (keep it here, mode 0600)")
        status(
            f"public node key {public_node}: send it to the coordinator, who lists it under your site name"
        )
        return
    private_path, public_path = make_keys(out, name, overwrite=overwrite)
    fingerprint = key_id(load_private_key(private_path).public_key())
    status(f"private key {private_path} (keep it here, mode 0600)")
    status(f"public key {public_path} (for auditors); key id {fingerprint}")
