"""`fedglm keys`: make the Ed25519 key pair that signs a site's ledger (or the coordinator's receipts)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedglm.cli.common import reports_errors
from fedglm.cli.progress import status
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
) -> None:
    """Make a signing key pair. Keep NAME.key at the site; give NAME.pub to the auditor."""
    private_path, public_path = make_keys(out, name, overwrite=overwrite)
    fingerprint = key_id(load_private_key(private_path).public_key())
    status(f"private key {private_path} (keep it here, mode 0600)")
    status(f"public key {public_path} (for auditors); key id {fingerprint}")
