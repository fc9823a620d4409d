"""The coordinator's side of the privacy ledgers: check each update's ledger line, countersign it.

An update from a DP site arrives with the signed ledger line the site wrote (and fsynced)
before sending it, and the site's public key. The coordinator accepts the update only if the
line's hash and signature hold under that key, the key is the one this site has always used
(pinned at its first receipt), and the entry names this run, this round, the model the
coordinator sent (its hash) and the very payload it arrived with (SHA-256 of the bytes), with
an epsilon within the site's declared budget. It then signs a receipt
(`privacy/receipts.py`), appends it to `receipts/<site>.jsonl` in the run folder, and sends it
to the site with the next message addressed to it.

The receipts also give the coordinator each site's cumulative epsilon (for `epsilon_max` in
`metrics.jsonl`) across restarts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedglm.atomic import append_line
from fedglm.compression import PayloadError
from fedglm.config import is_site_name
from fedglm.privacy.keys import key_id, public_key_from_pem
from fedglm.privacy.ledger import check_signed, parse_ledger
from fedglm.privacy.receipts import make_receipt, read_receipts, receipt_ok

BAD_LEDGER = "bad-ledger"


LEDGER_COPIES = "ledgers"  # <out>/ledgers/<site>.jsonl: every ledger line countersigned


class Countersigner:
    """Receipts for the ledger entries of one coordinator; see the module docstring."""

    def __init__(self, key: Ed25519PrivateKey, folder: Path, run_key: str) -> None:
        self.key = key
        self.folder = folder
        self.run_key = run_key
        self.site_keys: dict[str, str] = {}
        self.epsilon: dict[str, float] = {}
        self._pending: dict[int, str] = {}
        public = key.public_key()
        for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
            receipts, _ = read_receipts(path)
            for receipt in receipts:
                if receipt_ok(receipt, public):
                    client = receipt.body["client"]
                    self.site_keys.setdefault(client, receipt.body["site_key"])
                    self.epsilon[client] = float(receipt.body["epsilon"])

    def countersign(
        self, node: int, ledger: dict[str, Any], blob: bytes, server_round: int, base: bytes
    ) -> None:
        """Check the ledger line sent with `blob` and keep a receipt; `PayloadError` if it fails."""
        line_text, pem = ledger.get("line"), ledger.get("public-key")
        if not isinstance(line_text, str) or not isinstance(pem, str):
            raise PayloadError("the ledger record needs 'line' and 'public-key' strings", BAD_LEDGER)
        lines, problems = parse_ledger(line_text.replace("\n", " ") + "\n")
        if problems or len(lines) != 1:
            raise PayloadError(f"ledger line: {problems[0] if problems else 'empty'}", BAD_LEDGER)
        line, entry = lines[0], lines[0].entry
        try:
            site_key = public_key_from_pem(pem)
        except ValueError as exc:
            raise PayloadError(f"site public key: {exc}", BAD_LEDGER) from None
        client, site_key_id = entry["client"], key_id(site_key)
        expected = {
            "client is a site name": is_site_name(client),
            "signature": check_signed(line, site_key) is None,
            "the site's pinned key": self.site_keys.get(client, site_key_id) == site_key_id,
            "run": entry["run"] == self.run_key,
            "round": entry["round"] == server_round,
            "model received": entry["model_received"] == base.hex(),
            "update sent": entry["update_sent"] == hashlib.sha256(blob).hexdigest(),
            "unit and sampler": (entry["unit"], entry["sampler"]) == ("record", "poisson"),
            "epsilon within budget": float(entry["epsilon"]) <= float(entry["budget"]),
        }
        failed = [what for what, ok in expected.items() if not ok]
        if failed:
            raise PayloadError(f"ledger entry of {client!r} does not match: {', '.join(failed)}", BAD_LEDGER)
        receipt = json.dumps(make_receipt(line, self.key), sort_keys=True)
        append_line(self.folder / f"{client}.jsonl", receipt)
        # The site's own line, as received: the model card states each site's guarantee from it.
        append_line(self.folder.parent / LEDGER_COPIES / f"{client}.jsonl", json.dumps(line.as_json()))
        self.site_keys[client] = site_key_id
        self.epsilon[client] = float(entry["epsilon"])
        self._pending[node] = receipt

    def receipt_for(self, node: int) -> str | None:
        """The receipt to send with the next message to `node`, once."""
        return self._pending.pop(node, None)

    def epsilon_max(self) -> float | None:
        return max(self.epsilon.values()) if self.epsilon else None
