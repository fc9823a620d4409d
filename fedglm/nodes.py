"""Who may connect: each hospital's SuperNode key pair, and the coordinator's list of them.

With TLS alone anyone holding the public `ca.crt` can connect a SuperNode, and a site's name
was only what its ledger entries claimed: a rogue that connected first under a hospital's name
locked the hospital out, and one hospital could join under N names for N times the weight.
So fedglm uses Flower's SuperNode authentication and binds names to keys:
- each hospital has a node key pair (ECDSA P-384, OpenSSH format: `node.key`, `node.pub` in
  its state folder), made by `fedglm keys --node` or on the first `fedglm client`; its
  SuperNode signs every Fleet API request with it;
- the coordinator lists each hospital by name with its `node.pub` (`sites:` in its config);
  `fedglm server` starts the SuperLink with `--enable-supernode-auth` and registers exactly
  these keys, so an unlisted SuperNode cannot connect at all. A key listed twice, or a name
  listed twice, is refused: one hospital, one name, one weight;
- registration gives each key a node id; the run spec maps node ids to names, and the
  ServerApp accepts from a node only ledger entries of the site listed for it
  (`server/countersign.py`, rejection `wrong-site`).
Onboarding a hospital is: it sends its `node.pub` (public, like `ledger.pub`) to the
coordinator, who adds it under the hospital's name.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedglm.atomic import atomic_write_text
from fedglm.errors import InputError, check_out_folder

NODE_KEY = "node.key"
NODE_PUB = "node.pub"
MAX_KEY_FILE = 16 * 1024


def make_node_keys(folder: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write `node.key` (private, 0600) and `node.pub` into `folder`; keep an existing pair."""
    check_out_folder(folder)
    private_path, public_path = folder / NODE_KEY, folder / NODE_PUB
    if private_path.exists() and not overwrite:
        raise InputError(
            f"{private_path} already exists; the coordinator lists its public half, so keep it "
            "(or pass --overwrite and send the new node.pub to the coordinator)"
        )
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode("ascii")
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(private_path, private)
        os.chmod(private_path, 0o600)
        atomic_write_text(public_path, public.decode("ascii") + "\n")
    except OSError as exc:
        raise InputError(f"cannot write the node key pair into {folder}: {exc.strerror}") from None
    return private_path, public_path


def ensure_node_keys(folder: Path) -> Path:
    """The node's private key in `folder`, made on first use; returns its path."""
    private_path = folder / NODE_KEY
    if not private_path.exists():
        make_node_keys(folder)
    return private_path


def read_node_public_key(path: Path, what: str) -> bytes:
    """A hospital's `node.pub` (OpenSSH, NIST EC curve) as the PEM bytes Flower registers."""
    try:
        if path.stat().st_size > MAX_KEY_FILE:
            raise InputError(f"{what} {path} is not a node public key (over {MAX_KEY_FILE} bytes)")
        text = path.read_bytes()
    except OSError as exc:
        raise InputError(
            f"{what} {path} cannot be read ({exc.strerror}); ask the hospital for its node.pub"
        ) from None
    try:
        key = serialization.load_ssh_public_key(text.strip())
    except (ValueError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in (
        "secp256r1",
        "secp384r1",
        "secp521r1",
    ):
        raise InputError(
            f"{what} {path} is not an ECDSA (NIST P-256/384/521) public key in OpenSSH format; "
            "use the node.pub that `fedglm keys --node` or `fedglm client` made"
        )
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
