"""The fedglm Flower App bundle (FAB): thin, reproducible, and pinned by its hash.

`fedglm/fab/pyproject.toml` names the ServerApp and ClientApp modules of the installed fedglm
package and ships no code. Flower builds FABs reproducibly (fixed dates, sorted entries), so
the coordinator and every site compute the same SHA-256 from the same fedglm and Flower
releases; sites accept only that hash (see fedglm/clients/guard.py).
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

FAB_DIR = Path(__file__).parent / "fab"


@cache
def fab_bytes() -> bytes:
    content: bytes = build_fab_from_disk(FAB_DIR)
    return content


def fab_sha256() -> str:
    return hashlib.sha256(fab_bytes()).hexdigest()
