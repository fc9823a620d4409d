"""The coordinator's side of the privacy ledgers: check each release's ledger line, countersign it.

An update from a DP site arrives with the signed ledger line the site wrote (and fsynced)
before sending it, the site's public key, and (`earlier`) any lines of its ledger the site
holds no receipt for yet (a reply lost in a crash); a release of validation metrics likewise,
its values in the line itself. The coordinator accepts the release only if:
- the node that sent it is the one the coordinator listed under that site's name (with
  SuperNode authentication, `fedglm/nodes.py`), so no one can claim another site's name;
- every line's hash and signature hold under that key, the key is the one this site has
  always used (pinned at its first receipt);
- the lines continue the chain the coordinator has countersigned for this site: a line it
  already countersigned must be that very line (same hash), and the first new one must have
  the next sequence number, name the last countersigned line's hash as `prev`, and claim no
  lower epsilon. A site that lost or rolled back its ledger (and would spend its budget
  again) is refused here, round after round, until it restores the ledger;
- the last line names this run, this round, the kind of release the coordinator asked for,
  the model the coordinator sent (its hash) and the very payload it arrived with (SHA-256 of
  the bytes; of the canonical values for metrics), with an epsilon within the site's
  declared budget.
An update whose entry was countersigned before is a site sending a round's update again after
the coordinator crashed mid-round and resumed that round (`privacy/site.py`): the checks above
make it the very release the receipt covers, so it is accepted once more for this round, at no
new cost, and its receipt sent again. A site's update, and its metrics, are each accepted at
most once per round.

It then signs a receipt for each new line (`privacy/receipts.py`), appends them to
`receipts/<site>.jsonl` in the run folder and the lines themselves to
`ledgers/<site>.jsonl`, and sends the receipts to the site with the next message addressed
to it.

The receipts also give the coordinator each site's cumulative epsilon (for `epsilon_max` in
`metrics.jsonl` and the model card) across restarts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedglm.atomic import append_line
from fedglm.compression import PayloadError
from fedglm.config import is_site_name
from fedglm.layout import LEDGER_COPIES
from fedglm.privacy.keys import key_id, public_key_from_pem
from fedglm.privacy.ledger import LedgerLine, check_signed, parse_ledger, release_of
from fedglm.privacy.receipts import make_receipt, read_receipts, receipt_ok
from fedglm.privacy.site import metrics_digest
from fedglm.protocol import MAX_CATCH_UP

BAD_LEDGER = "bad-ledger"
WRONG_SITE = "wrong-site"


MAX_PEM_CHARS = 1024  # an Ed25519 public key in PEM is 113 characters


class Countersigner:
    """Receipts for the ledger entries of one coordinator; see the module docstring."""

    def __init__(
        self, key: Ed25519PrivateKey, folder: Path, run_key: str, nodes: dict[int, str] | None = None
    ) -> None:
        self.key = key
        self.nodes = nodes  # node id -> the site listed for it (SuperNode authentication), if any
        self.folder = folder
        self.run_key = run_key
        self.site_keys: dict[str, str] = {}
        self.epsilon: dict[str, float] = {}
        self.chains: dict[str, dict[int, str]] = {}  # site -> sequence -> countersigned entry hash
        self._pending: dict[int, list[str]] = {}
        # (site, release) -> the last round such a release of it was accepted
        self._accepted: dict[tuple[str, str], int] = {}
        public = key.public_key()
        for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
            receipts, _ = read_receipts(path)
            for receipt in receipts:
                if receipt_ok(receipt, public):
                    body = receipt.body
                    client = body["client"]
                    self.site_keys.setdefault(client, body["site_key"])
                    self.chains.setdefault(client, {})[int(body["sequence"])] = body["entry_hash"]
                    self.epsilon[client] = max(self.epsilon.get(client, 0.0), float(body["epsilon"]))

    def countersign(
        self, node: int, ledger: dict[str, Any], update: bytes | None, server_round: int, base: bytes
    ) -> LedgerLine:
        """Check the ledger lines of a release and keep receipts; `PayloadError` if they fail.
        `update`: the payload an update's line must name; None for a metrics release, whose
        values are in its line. Returns the release's line."""
        lines, site_key = _read_lines(ledger)
        entry = lines[-1].entry
        client, site_key_id = entry["client"], key_id(site_key)
        if self.nodes is not None and self.nodes.get(node) != client:
            raise PayloadError(
                f"node {node} is listed for site {self.nodes.get(node)!r}, not {str(client)[:64]!r}",
                WRONG_SITE,
            )
        release = "update" if update is not None else "metrics"
        sent = hashlib.sha256(update).hexdigest() if update is not None else metrics_digest(entry["metrics"])
        expected = {
            "client is a site name": is_site_name(client),
            "one client": all(x.entry["client"] == client for x in lines),
            "signature": all(check_signed(x, site_key) is None for x in lines),
            "the site's pinned key": self.site_keys.get(client, site_key_id) == site_key_id,
            "run": entry["run"] == self.run_key,
            "round": entry["round"] == server_round,
            f"release {release}": release_of(entry) == release,
            "model received": entry["model_received"] == base.hex(),
            "what was sent": entry["update_sent"] == sent,
            "unit": all(x.entry["unit"] == "record" for x in lines),
            "epsilon within budget": float(entry["epsilon"]) <= float(entry["budget"]),
        }
        failed = [what for what, ok in expected.items() if not ok]
        if failed:
            raise PayloadError(f"ledger entry of {client!r} does not match: {', '.join(failed)}", BAD_LEDGER)
        if self._accepted.get((client, release)) == server_round:
            raise PayloadError(f"a second {release} release from {client!r} this round", "duplicate-site")
        new = self._continuation(client, lines)
        if not new:  # sent again after a restart (see the module docstring): its receipt too
            self._pending.setdefault(node, []).append(
                json.dumps(make_receipt(lines[-1], self.key), sort_keys=True)
            )
            self._accepted[(client, release)] = server_round
            return lines[-1]
        receipts = [json.dumps(make_receipt(x, self.key), sort_keys=True) for x in new]
        for receipt, x in zip(receipts, new, strict=True):
            append_line(self.folder / f"{client}.jsonl", receipt)
            # The site's own line, as received: the model card states each site's guarantee from it.
            append_line(self.folder.parent / LEDGER_COPIES / f"{client}.jsonl", json.dumps(x.as_json()))
            self.chains.setdefault(client, {})[int(x.entry["sequence"])] = x.hash
        self.site_keys[client] = site_key_id
        self.epsilon[client] = max(self.epsilon.get(client, 0.0), float(entry["epsilon"]))
        self._pending.setdefault(node, []).extend(receipts)
        self._accepted[(client, release)] = server_round
        return lines[-1]

    def _continuation(self, client: str, lines: list[LedgerLine]) -> list[LedgerLine]:
        """The lines not yet countersigned, checked to continue this site's countersigned chain."""
        chain = self.chains.get(client, {})
        last = max(chain, default=None)
        epsilon = self.epsilon.get(client, 0.0)
        new: list[LedgerLine] = []
        for x in lines:
            sequence = int(x.entry["sequence"])
            if sequence in chain and not new:
                if chain[sequence] != x.hash:
                    raise PayloadError(
                        f"ledger of {client!r}: entry {sequence} differs from the one countersigned "
                        "(a lost or rolled-back ledger)",
                        BAD_LEDGER,
                    )
                continue
            previous = new[-1] if new else None
            if previous is not None:
                next_sequence, prev_hash = int(previous.entry["sequence"]) + 1, previous.hash
            elif last is not None:
                next_sequence, prev_hash = last + 1, chain[last]
            else:  # the first line this coordinator sees from the site: the chain starts here
                next_sequence, prev_hash = sequence, x.entry["prev"]
            if sequence != next_sequence or x.entry["prev"] != prev_hash:
                raise PayloadError(
                    f"ledger of {client!r}: entry {sequence} does not follow the last countersigned "
                    f"entry {next_sequence - 1} (a lost, rolled-back or forked ledger)",
                    BAD_LEDGER,
                )
            if float(x.entry["epsilon"]) < epsilon:
                raise PayloadError(
                    f"ledger of {client!r}: entry {sequence} claims epsilon {float(x.entry['epsilon']):.4f}, "
                    f"below the {epsilon:.4f} already countersigned",
                    BAD_LEDGER,
                )
            epsilon = float(x.entry["epsilon"])
            new.append(x)
        if new and new[-1] is not lines[-1]:
            raise PayloadError(f"ledger of {client!r}: the release's entry is not its last line", BAD_LEDGER)
        return new

    def receipt_for(self, node: int) -> list[str]:
        """The receipts to send with the next message to `node`, once."""
        return self._pending.pop(node, [])


def _read_lines(ledger: dict[str, Any]) -> tuple[list[LedgerLine], Ed25519PublicKey]:
    """The ledger lines of a reply (earlier ones first) and the site's public key."""
    line_text, pem, earlier = ledger.get("line"), ledger.get("public-key"), ledger.get("earlier", [])
    if not isinstance(line_text, str) or not isinstance(pem, str) or len(pem) > MAX_PEM_CHARS:
        raise PayloadError("the ledger record needs 'line' and 'public-key' (PEM) strings", BAD_LEDGER)
    if (
        not isinstance(earlier, list)
        or len(earlier) > MAX_CATCH_UP
        or not all(isinstance(x, str) for x in earlier)
    ):
        raise PayloadError(
            f"the ledger record's 'earlier' must be at most {MAX_CATCH_UP} strings", BAD_LEDGER
        )
    texts = [*earlier, line_text]
    lines, problems = parse_ledger("".join(text.replace("\n", " ") + "\n" for text in texts))
    if problems or len(lines) != len(texts):
        raise PayloadError(f"ledger line: {problems[0] if problems else 'empty'}", BAD_LEDGER)
    try:
        site_key = public_key_from_pem(pem)
    except ValueError as exc:
        raise PayloadError(f"site public key: {exc}", BAD_LEDGER) from None
    return lines, site_key
