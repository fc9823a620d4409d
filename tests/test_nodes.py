"""Node key pairs, and the coordinator's list of hospitals (one name, one key)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from pydantic import ValidationError

from fedglm.config import CoordinatorConfig
from fedglm.errors import InputError
from fedglm.nodes import ensure_node_keys, make_node_keys, read_node_public_key
from fedglm.server.coordinator import read_listed_keys


def test_a_node_key_pair_is_what_flower_loads(tmp_path: Path) -> None:
    private, public = make_node_keys(tmp_path)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = serialization.load_ssh_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    pem = read_node_public_key(public, "node_key")
    assert serialization.load_pem_public_key(pem) == key.public_key()
    with pytest.raises(InputError, match="already exists"):
        make_node_keys(tmp_path)
    before = private.read_bytes()
    assert ensure_node_keys(tmp_path) == private and private.read_bytes() == before


def test_a_key_that_is_not_a_node_key_is_refused_in_one_line(tmp_path: Path) -> None:
    ed = tmp_path / "ed.pub"
    ed.write_bytes(
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    for path, text in ((tmp_path / "junk.pub", b"ssh-rsa AAAA"), (tmp_path / "big.pub", b"A" * 100_000)):
        path.write_bytes(text)
        with pytest.raises(InputError, match="not"):
            read_node_public_key(path, "node_key")
    with pytest.raises(InputError, match="not an ECDSA"):
        read_node_public_key(ed, "node_key")
    with pytest.raises(InputError, match="cannot be read"):
        read_node_public_key(tmp_path / "missing.pub", "node_key")


def test_one_hospital_cannot_be_listed_under_two_names(tmp_path: Path) -> None:
    _, public = make_node_keys(tmp_path / "a")
    with pytest.raises(ValidationError, match="name h1 is listed twice"):
        CoordinatorConfig.model_validate(
            {"sites": [{"name": "h1", "node_key": str(public)}, {"name": "h1", "node_key": "b.pub"}]}
        )
    with pytest.raises(ValidationError, match=r"node_key .* is listed twice"):
        CoordinatorConfig.model_validate(
            {"sites": [{"name": "h1", "node_key": str(public)}, {"name": "h2", "node_key": str(public)}]}
        )
    copy = tmp_path / "copy.pub"
    copy.write_bytes(public.read_bytes())  # the same key under another file name
    cfg = CoordinatorConfig.model_validate(
        {"sites": [{"name": "h1", "node_key": str(public)}, {"name": "h2", "node_key": str(copy)}]}
    )
    assert cfg.sites is not None
    with pytest.raises(InputError, match="h2 and h1 list the same node key"):
        read_listed_keys(cfg.sites)
