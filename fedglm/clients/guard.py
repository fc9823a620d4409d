"""A site runs fedglm's own app and nothing else: the guarded `flwr-clientapp`.

In open-source Flower (1.41 and 1.42) whoever reaches the coordinator's port can submit an app bundle
(FAB) that every SuperNode executes, and a FAB's folder is put first on `sys.path`, so it could
even shadow the installed fedglm. Flower's own check (`--trusted-entities`) accepts only FABs
signed through Flower Hub, never one submitted from a private coordinator.

So `fedglm client` puts a `flwr-clientapp` of its own first on the SuperNode's PATH (Flower's
`flower-superexec` starts the ClientApp process by that name). It is Flower's ClientApp runner
with one check added at the moment the FAB arrives, before a single file of it is unpacked or
imported: the SHA-256 of the bundle's bytes must be that of the thin fedglm app built from this
site's own install (`FEDGLM_ALLOWED_FAB_SHA256`, set by `fedglm client`). Anything else is
refused with an error reply to the coordinator; the SuperNode stays up for the next task. Each
ClientApp process also gets a fresh, empty FLWR_HOME, so no app folder is ever reused.

What remains (see clients/README.md): the coordinator and every site must run the same fedglm
and Flower release (the bundle's hash depends on both); a site still trusts the coordinator's
messages (model and round config, validated on arrival); the SuperLink port must be firewalled
to the hospitals, since the Control API on it has no authentication in open-source Flower.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from fedglm import flower
from fedglm.app_bundle import ALLOWED_ENV, allowed_hashes, check_fab, write_shim
from fedglm.processes import die_with_parent

SHIM_NAME = "flwr-clientapp"


def main() -> None:
    """Entry point of the guarded `flwr-clientapp` (same arguments as Flower's)."""
    die_with_parent()  # a ClientApp never outlives its SuperNode
    if not allowed_hashes():
        print(f"fedglm guard: {ALLOWED_ENV} is not set; refusing to run any app", file=sys.stderr)
        sys.exit(2)
    allowed = allowed_hashes()
    flower.hook_clientapp_bundle_check(lambda content, claimed: check_fab(content, claimed, allowed))
    home = tempfile.mkdtemp(prefix="fedglm-clientapp-")
    os.environ["FLWR_HOME"] = home
    try:
        flower.run_clientapp()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def write_clientapp_shim(bin_dir: Path) -> Path:
    """The `flwr-clientapp` executable that runs `main` with this Python."""
    return write_shim(bin_dir, SHIM_NAME, "fedglm.clients.guard:main")
