"""The coordinator's receipts: a countersignature of each ledger entry it receives.

When an update arrives with its ledger line, the coordinator checks the line's signature
against the key the site uses, that it names this run, this round, the model the coordinator
sent and the very payload it came with; then it signs a receipt of the entry's hash. The
coordinator keeps every receipt (`receipts/<site>.jsonl` in its run folder) and sends each site
its receipt with the next message, to keep beside its ledger. A site that later rewrites its
ledger cannot make the receipts match again.

A receipt line is `{"receipt": {...}, "signature": S}`, S the Ed25519 signature (hex) of the
receipt's canonical JSON by the coordinator's key.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedglm import strict_json
from fedglm.privacy.keys import key_id, verify
from fedglm.privacy.ledger import LedgerLine, Problem, canonical, read_text_file

FORMAT = "fedglm-receipt/1"
MAX_RECEIPT_CHARS = 4096  # a real receipt is about 700 characters
RECEIPT_FIELDS: dict[str, tuple[type, ...]] = {
    "format": (str,),
    "client": (str,),
    "run": (str,),
    "round": (int,),
    "sequence": (int,),
    "entry_hash": (str,),
    "epsilon": (float, int),
    "site_key": (str,),
    "server_key": (str,),
    "time": (str,),
}


@dataclass(frozen=True)
class Receipt:
    number: int
    body: dict[str, Any]
    signature: str


def make_receipt(line: LedgerLine, key: Ed25519PrivateKey) -> dict[str, Any]:
    entry = line.entry
    body = {
        "format": FORMAT,
        "client": entry["client"],
        "run": entry["run"],
        "round": entry["round"],
        "sequence": entry["sequence"],
        "entry_hash": line.hash,
        "epsilon": entry["epsilon"],
        "site_key": entry["key"],
        "server_key": key_id(key.public_key()),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return {"receipt": body, "signature": key.sign(canonical(body)).hex()}


def parse_receipt(obj: Any) -> tuple[dict[str, Any], str] | str:
    """(body, signature) of a receipt object, or why it is not one."""
    if not isinstance(obj, dict) or set(obj) != {"receipt", "signature"}:
        return "expected an object with exactly receipt and signature"
    body, signature = obj["receipt"], obj["signature"]
    if not isinstance(body, dict) or set(body) != set(RECEIPT_FIELDS) or not isinstance(signature, str):
        return f"a receipt needs exactly the fields {', '.join(RECEIPT_FIELDS)} and a hex signature"
    for name, types in RECEIPT_FIELDS.items():
        if isinstance(body[name], bool) or not isinstance(body[name], types):
            return f"receipt field '{name}' is {body[name]!r}"
    if body["format"] != FORMAT:
        return f"receipt format is {body['format']!r}, expected {FORMAT!r}"
    return body, signature


def read_receipts(path: Path) -> tuple[list[Receipt], list[Problem]]:
    """The receipts in a JSONL file, and a problem for each line that is not one."""
    text = read_text_file(path, "receipts file")
    receipts: list[Receipt] = []
    problems: list[Problem] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        try:
            parsed = parse_receipt(strict_json.loads(raw, max_chars=MAX_RECEIPT_CHARS))
        except strict_json.StrictJSONError as exc:
            parsed = f"not one unambiguous JSON object: {exc}"
        if isinstance(parsed, str):
            problems.append(Problem(number, f"receipts: {parsed}"))
        else:
            receipts.append(Receipt(number, *parsed))
    return receipts, problems


def receipt_ok(receipt: Receipt, key: Ed25519PublicKey) -> bool:
    if receipt.body["server_key"] != key_id(key):
        return False
    try:
        signature = bytes.fromhex(receipt.signature)
    except ValueError:
        return False
    return verify(key, signature, canonical(receipt.body))
