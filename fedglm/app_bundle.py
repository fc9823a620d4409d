"""The fedglm Flower App bundle (FAB): thin, reproducible, pinned by its hash, and guarded.

`fedglm/fab/pyproject.toml` names the ServerApp and ClientApp modules of the installed fedglm
package and ships no code. Flower builds FABs reproducibly (fixed dates, sorted entries), so
the coordinator and every site compute the same SHA-256 from the same fedglm and Flower
releases. Both sides execute only that hash: the site's guarded `flwr-clientapp`
(fedglm/clients/guard.py) and the coordinator's guarded SuperLink and `flwr-serverapp`
(fedglm/server/guard.py) check a bundle's bytes with `check_fab` before a file of it is
unpacked or imported. The allowed hashes travel to those processes in `ALLOWED_ENV`.

Guarded processes are started through small shims put first on the PATH that Flower searches
(`write_shim`): each runs a fedglm entry point with this Python, which installs the check and
then hands over to Flower's own entry point with the same arguments.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
from functools import cache
from pathlib import Path

from fedglm.flower import build_fab

FAB_DIR = Path(__file__).parent / "fab"
ALLOWED_ENV = "FEDGLM_ALLOWED_FAB_SHA256"


class AppRefused(RuntimeError):
    """The submitted app bundle is not fedglm's own."""


@cache
def fab_bytes() -> bytes:
    return build_fab(FAB_DIR)


def fab_sha256() -> str:
    return hashlib.sha256(fab_bytes()).hexdigest()


def allowed_hashes() -> set[str]:
    value = os.environ.get(ALLOWED_ENV, "")
    return {h.strip().lower() for h in value.split(",") if h.strip()}


def check_fab(content: bytes, claimed_hash: str, allowed: set[str]) -> None:
    """Raise `AppRefused` unless `content` is an allowed bundle and `claimed_hash` its SHA-256."""
    digest = hashlib.sha256(content).hexdigest()
    if digest not in allowed:
        raise AppRefused(f"refused app bundle sha256={digest}: fedglm runs only fedglm's own app")
    if claimed_hash != digest:
        raise AppRefused(f"refused app bundle: claimed hash {claimed_hash} is not its sha256 {digest}")


def write_shim(bin_dir: Path, name: str, entry: str) -> Path:
    """Write executable `bin_dir/name` that runs `entry` ("module:function") with this Python."""
    module, function = entry.split(":")
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / name
    shim.write_text(
        f"#!/bin/sh\nexec '{sys.executable}' -c 'from {module} import {function}; {function}()' \"$@\"\n",
        encoding="utf-8",
    )
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return shim
