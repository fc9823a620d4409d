"""A site's privacy ledger: one JSONL file, one signed line per release of the site.

Each line is `{"entry": {...}, "hash": H, "signature": S}`:
- `entry` holds the fields of `ENTRY_FIELDS` (what was released, under which guarantee, and
  the cumulative epsilon the site's accountant computed after it). `release` says what:
  - `update`: a round's training update, DP-SGD (`sampler` poisson, `q`, `sigma`, `steps`,
    `clip_norm`, `expected_batch`); `metrics` is `{}`;
  - `metrics`: the round's validation metrics, the Gaussian mechanism on every validation
    record once (`sampler` none, `q` 1, `steps` 1, `clip_norm` 1, `sigma` the noise
    multiplier; `metric_release.py`), with the released values themselves in `metrics`;
  lines of format 2 (before metric releases) are updates and have neither field;
- `H` is the SHA-256 (hex) of the entry's canonical JSON (keys sorted, no spaces, ASCII, no
  NaN); each entry names its predecessor's `H` in `prev` (64 zeros for the first), so edits,
  deletions and re-orderings break the chain;
- `S` is the Ed25519 signature (hex) of the same canonical bytes by the site's key, whose id
  (`keys.key_id`) the entry names in `key`.

Lines are appended with one write and an fsync before the update they describe leaves the
site: an entry on disk counts as spent even if the upload never happened.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedglm import strict_json
from fedglm.atomic import append_json_line
from fedglm.errors import InputError
from fedglm.privacy.keys import key_id, verify
from fedglm.privacy.metric_release import check_released

FORMAT = "fedglm-ledger/3"
FORMAT_2 = "fedglm-ledger/2"  # still read: updates only, without `release` and `metrics`
MAX_LINE_CHARS = 16_384  # a real line is about 1,000 characters
GENESIS = "0" * 64

# field -> accepted JSON types
ENTRY_FIELDS: dict[str, tuple[type, ...]] = {
    "format": (str,),
    "client": (str,),
    "key": (str,),
    "run": (str,),
    "round": (int,),
    "sequence": (int,),
    "unit": (str,),
    "sampler": (str,),
    "q": (float, int),
    "sigma": (float, int),
    "steps": (int,),
    "clip_norm": (float, int),
    "delta": (float, int),
    "accountant": (str,),
    "accountant_version": (str,),
    "epsilon": (float, int),
    "budget": (float, int),
    "expected_batch": (float, int),
    "record_count_public": (bool,),
    "mode": (str,),
    "precision": (str,),
    "model_received": (str,),
    "update_sent": (str,),
    "config_hash": (str,),
    "prev": (str,),
    "time": (str,),
    "release": (str,),
    "metrics": (dict,),
}
FIELDS_ADDED_IN_3 = ("release", "metrics")
RELEASES = ("update", "metrics")


# The values an accountant can take (a line outside them is malformed, not a claim to check).
RANGES: dict[str, tuple[float, float, str]] = {
    "sequence": (0, 2**53, "expected a sequence number from 0"),
    "round": (0, 2**53, "expected a round number from 0"),
    "steps": (1, 10**9, "expected 1 to 1e9 steps"),
    "q": (0.0, 1.0, "expected a sampling rate in (0, 1]"),
    "sigma": (0.0, 1e6, "expected a noise multiplier in (0, 1e6]"),
    "delta": (0.0, 0.5, "expected a delta in (0, 0.5]"),
    "epsilon": (0.0, 1e6, "expected an epsilon in [0, 1e6]"),
    "budget": (0.0, 1e6, "expected a budget in [0, 1e6]"),
    "clip_norm": (0.0, 1e9, "expected a positive clipping norm"),
    "expected_batch": (1.0, 1e9, "expected an expected batch size of at least 1"),
}


def canonical(obj: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace, ASCII only, no NaN or infinity."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode(
        "ascii"
    )


def entry_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(entry)).hexdigest()


@dataclass(frozen=True)
class LedgerLine:
    number: int  # 1-based line number in the file
    entry: dict[str, Any]
    hash: str
    signature: str

    def as_json(self) -> dict[str, Any]:
        return {"entry": self.entry, "hash": self.hash, "signature": self.signature}


@dataclass(frozen=True)
class Problem:
    line: int  # 0: the file as a whole
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}" if self.line else self.reason


def _check_fields(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return "'entry' is not an object"
    fields = ENTRY_FIELDS
    if entry.get("format") == FORMAT_2:
        fields = {k: v for k, v in ENTRY_FIELDS.items() if k not in FIELDS_ADDED_IN_3}
    missing = [f for f in fields if f not in entry]
    if missing:
        return f"entry lacks field(s) {', '.join(missing)}"
    extra = sorted(set(entry) - set(fields))
    if extra:
        return f"entry has unknown field(s) {', '.join(extra)}"
    for name, types in fields.items():
        value = entry[name]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            return f"field '{name}' is {value!r}, expected {' or '.join(t.__name__ for t in types)}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"field '{name}' is not finite"
    if entry["format"] not in (FORMAT, FORMAT_2):
        return f"format is {entry['format']!r}, expected {FORMAT!r}"
    for name, (low, high, what) in RANGES.items():
        if not low <= entry[name] <= high:
            return f"field '{name}' is {entry[name]!r}, {what}"
    if entry["q"] <= 0 or entry["sigma"] <= 0 or entry["delta"] <= 0:
        return "q, sigma and delta must be positive"
    return _check_release(entry)


def _check_release(entry: dict[str, Any]) -> str | None:
    """The fields that depend on what the line releases (module docstring)."""
    release = release_of(entry)
    if release not in RELEASES:
        return f"release is {release!r}, expected one of {', '.join(RELEASES)}"
    if release == "update":
        if entry["sampler"] != "poisson" or entry.get("metrics", {}) != {}:
            return "an update line needs sampler poisson and an empty metrics object"
        return None
    if (entry["sampler"], entry["q"], entry["steps"], entry["clip_norm"]) != ("none", 1, 1, 1):
        return "a metrics line needs sampler none, q 1, steps 1 and clip_norm 1"
    reason = check_released(entry["metrics"])
    return None if reason is None else f"field 'metrics': {reason}"


def release_of(entry: dict[str, Any]) -> str:
    """What a (well-formed) entry released: `update` or `metrics`."""
    return str(entry.get("release", "update"))


def split_releases(lines: list[LedgerLine]) -> tuple[list[LedgerLine], list[LedgerLine]]:
    """The lines of training updates, and those of metric releases."""
    updates = [line for line in lines if release_of(line.entry) == "update"]
    return updates, [line for line in lines if release_of(line.entry) == "metrics"]


def parse_ledger(text: str) -> tuple[list[LedgerLine], list[Problem]]:
    """The well-formed lines of a ledger's text, and a problem for each line that is not."""
    lines: list[LedgerLine] = []
    problems: list[Problem] = []
    raw_lines = text.split("\n")
    if raw_lines and raw_lines[-1] == "":
        raw_lines.pop()
    elif raw_lines:
        problems.append(Problem(len(raw_lines), "the last line is truncated (no line end)"))
    for number, raw in enumerate(raw_lines, start=1):
        try:
            obj = strict_json.loads(raw, max_chars=MAX_LINE_CHARS)
        except strict_json.StrictJSONError as exc:
            problems.append(Problem(number, f"not one unambiguous JSON object: {exc}"))
            continue
        if not isinstance(obj, dict) or set(obj) != {"entry", "hash", "signature"}:
            problems.append(Problem(number, "expected an object with exactly entry, hash and signature"))
            continue
        reason = _check_fields(obj["entry"])
        if reason is None and not (isinstance(obj["hash"], str) and isinstance(obj["signature"], str)):
            reason = "hash and signature must be hex strings"
        if reason is not None:
            problems.append(Problem(number, reason))
            continue
        lines.append(LedgerLine(number, obj["entry"], obj["hash"], obj["signature"]))
    return lines, problems


def read_text_file(path: Path, what: str = "ledger") -> str:
    """The text of a ledger (or receipts) file, or an `InputError` if it cannot be read at all."""
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist (or is not a file)")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {path}: not UTF-8 text (byte {exc.start}); is this a {what}?") from None


def verify_chain(lines: list[LedgerLine], key: Ed25519PublicKey) -> list[Problem]:
    """Every hash, signature, sequence number and chain link of `lines` (parsed in file order)."""
    problems: list[Problem] = []
    expected_key = key_id(key)
    prev = GENESIS
    client = lines[0].entry["client"] if lines else None
    for index, line in enumerate(lines):
        entry, n = line.entry, line.number
        actual = entry_hash(entry)
        reason = check_signed(line, key, expected_key)
        if reason is not None:
            problems.append(Problem(n, reason))
        if entry["sequence"] != index:
            problems.append(
                Problem(n, f"sequence {entry['sequence']}, expected {index} (a line deleted or moved)")
            )
        if entry["prev"] != prev:
            problems.append(
                Problem(n, "prev does not name the previous line's hash (a line deleted or moved)")
            )
        if entry["client"] != client:
            problems.append(
                Problem(n, f"client {entry['client']!r} differs from the first line's {client!r}")
            )
        prev = actual
    return problems


def check_signed(line: LedgerLine, key: Ed25519PublicKey, expected_key: str | None = None) -> str | None:
    """Why `line`'s hash or signature does not hold under `key`; None if both do."""
    expected_key = expected_key or key_id(key)
    if line.hash != entry_hash(line.entry):
        return "the entry does not match its hash (an edited field)"
    if line.entry["key"] != expected_key:
        return f"signed with key {line.entry['key'][:16]}..., not the given public key {expected_key[:16]}..."
    if not _signature_ok(key, line.signature, line.entry):
        return "the signature does not verify with the given public key"
    return None


def _signature_ok(key: Ed25519PublicKey, signature: str, entry: dict[str, Any]) -> bool:
    try:
        raw = bytes.fromhex(signature)
    except ValueError:
        return False
    return verify(key, raw, canonical(entry))


def sign_line(entry: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """The ledger line for `entry`: the entry, its hash and the site's signature."""
    return {"entry": entry, "hash": entry_hash(entry), "signature": key.sign(canonical(entry)).hex()}


def load_own_ledger(path: Path, key: Ed25519PublicKey) -> list[LedgerLine]:
    """A site's own ledger, checked in full before it is extended; damage stops the site."""
    if not path.exists():
        return []
    lines, problems = parse_ledger(read_text_file(path))
    problems += verify_chain(lines, key)
    if problems:
        raise InputError(
            f"privacy ledger {path} does not verify ({problems[0]}); no round can be accounted on "
            "it: restore it from a backup (its receipts are on the coordinator)"
        )
    return lines


def append_entry(
    path: Path, lines: list[LedgerLine], fields: dict[str, Any], key: Ed25519PrivateKey
) -> LedgerLine:
    """Chain, sign and durably append an entry after `lines` (the ledger as just verified)."""
    entry = {
        **fields,
        "format": FORMAT,
        "key": key_id(key.public_key()),
        "sequence": len(lines),
        "prev": lines[-1].hash if lines else GENESIS,
    }
    reason = _check_fields(entry)
    if reason is not None:
        raise ValueError(f"ledger entry: {reason}")
    signed = sign_line(entry, key)
    append_json_line(path, signed)
    return LedgerLine(len(lines) + 1, entry, signed["hash"], signed["signature"])
