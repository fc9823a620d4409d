"""Ed25519 keys that sign ledger entries (a site's) and receipts (the coordinator's).

`fedglm keys --out DIR --name NAME` writes `NAME.key` (PKCS#8 PEM, mode 0600) and `NAME.pub`
(SubjectPublicKeyInfo PEM, for auditors). A key's id is the SHA-256 of its raw 32 public bytes,
in hex; entries and receipts name the key that signed them by this id.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedglm.atomic import atomic_write_text
from fedglm.errors import InputError, check_out_folder


def key_paths(out_dir: Path, name: str) -> tuple[Path, Path]:
    return out_dir / f"{name}.key", out_dir / f"{name}.pub"


def make_keys(out_dir: Path, name: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new key pair; refuses to replace an existing private key unless `overwrite`."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name) or ".." in name:
        raise InputError(
            f"--name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (no path separators); "
            "the files go into --out"
        )
    check_out_folder(out_dir)
    private_path, public_path = key_paths(out_dir, name)
    if private_path.exists() and not overwrite:
        raise InputError(
            f"{private_path} already exists; a site's ledger is tied to its key, so keep it "
            "(or pass --overwrite to replace it)"
        )
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")
    try:
        atomic_write_text(private_path, private_pem)
        os.chmod(private_path, 0o600)
        atomic_write_text(public_path, public_pem(key.public_key()))
    except OSError as exc:
        raise InputError(f"cannot write the key pair into {out_dir}: {exc.strerror}") from None
    return private_path, public_path


def public_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def load_private_key(path: Path) -> Ed25519PrivateKey:
    if not path.is_file():
        raise InputError(f"no signing key at {path}; create one with `fedglm keys --out {path.parent}`")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(f"{path}: not an Ed25519 key; create one with `fedglm keys`")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    if not path.is_file():
        raise InputError(f"public key file {path} does not exist")
    try:
        return public_key_from_pem(path.read_text(encoding="ascii"))
    except ValueError as exc:
        raise InputError(f"{path}: {exc}") from None


def public_key_from_pem(pem: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise ValueError(f"not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def key_id(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def verify(key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True
