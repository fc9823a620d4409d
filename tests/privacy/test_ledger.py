"""Tamper evidence: every single-field edit, deletion, reordering and re-signing is detected."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedglm.errors import InputError
from fedglm.privacy.audit import audit_ledger
from fedglm.privacy.ledger import (
    ENTRY_FIELDS,
    GENESIS,
    entry_hash,
    load_own_ledger,
    parse_ledger,
    sign_line,
    verify_chain,
)
from fedglm.privacy.receipts import read_receipts
from tests.privacy.helpers import Site, ledger_of


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return ledger_of(tmp_path_factory.mktemp("ledger"), rounds=4)


def problems_of(site: Site, lines: list[str]) -> list[str]:
    """What the chain alone shows, plus what the coordinator's receipts show (`fedglm audit`)."""
    text = "".join(line + "\n" for line in lines)
    parsed, problems = parse_ledger(text)
    chain = [str(p) for p in problems + verify_chain(parsed, site.public)]
    if not parsed:
        return chain or ["empty"]
    report = audit_ledger(
        text, site.public, server_key=site.server_key.public_key(), receipts=read_receipts(site.receipts)
    )
    return chain + [str(p) for p in report.problems if str(p) not in chain]


def raw_lines(site: Site) -> list[str]:
    return site.ledger.read_text().splitlines()


def edited(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 1.5 + 0.001
    if isinstance(value, dict):
        return {**value, "count": 1.0}
    return "0" + value[1:] if value[:1] != "0" else "1" + value[1:]


def test_an_untouched_ledger_and_its_receipts_verify(site: Site) -> None:
    assert problems_of(site, raw_lines(site)) == []
    first = json.loads(raw_lines(site)[0])["entry"]
    assert (first["sequence"], first["prev"], first["unit"], first["sampler"]) == (
        0,
        GENESIS,
        "record",
        "poisson",
    )


@pytest.mark.parametrize("line", range(4))
@pytest.mark.parametrize("field", sorted(ENTRY_FIELDS))
def test_every_single_field_edit_is_detected(site: Site, field: str, line: int) -> None:
    lines = raw_lines(site)
    obj = json.loads(lines[line])
    obj["entry"][field] = edited(obj["entry"][field])
    lines[line] = json.dumps(obj)
    assert problems_of(site, lines)


@pytest.mark.parametrize("part", ["hash", "signature"])
def test_edited_hash_or_signature_is_detected(site: Site, part: str) -> None:
    lines = raw_lines(site)
    obj = json.loads(lines[1])
    obj[part] = edited(obj[part])
    lines[1] = json.dumps(obj)
    assert problems_of(site, lines)


@pytest.mark.parametrize("line", range(4))
def test_every_deletion_is_detected(site: Site, line: int) -> None:
    lines = raw_lines(site)
    del lines[line]
    # the last line leaves a valid chain behind: the coordinator's receipt for it shows the loss
    assert any("deleted or moved" in p or "does not hold" in p for p in problems_of(site, lines))


@pytest.mark.parametrize("first", range(3))
def test_every_swap_of_neighbours_is_detected(site: Site, first: int) -> None:
    lines = raw_lines(site)
    lines[first], lines[first + 1] = lines[first + 1], lines[first]
    assert any("deleted or moved" in p for p in problems_of(site, lines))


@pytest.mark.parametrize("line", range(4))
def test_a_line_re_signed_with_another_key_is_detected(site: Site, line: int) -> None:
    other = Ed25519PrivateKey.generate()
    lines = raw_lines(site)
    entry = dict(json.loads(lines[line])["entry"], epsilon=0.001)
    lines[line] = json.dumps(sign_line(entry, other))  # a consistent hash, a valid signature by `other`
    assert any("signature does not verify" in p for p in problems_of(site, lines))


def test_a_truncated_last_line_is_detected(site: Site) -> None:
    text = site.ledger.read_text()
    parsed, problems = parse_ledger(text[: len(text) - 40])
    assert [str(p) for p in problems] == [
        "line 4: the last line is truncated (no line end)",
        "line 4: not valid JSON (Unterminated string starting at)",
    ] or any("truncated" in str(p) for p in problems)
    assert len(parsed) == 3


def test_a_wrong_public_key_fails_every_line(site: Site) -> None:
    parsed, _ = parse_ledger(site.ledger.read_text())
    problems = verify_chain(parsed, Ed25519PrivateKey.generate().public_key())
    assert len(problems) == 4 and all("not the given public key" in p.reason for p in problems)


def test_a_site_refuses_to_extend_a_damaged_ledger(site: Site, tmp_path: Path) -> None:
    copy = tmp_path / "ledger.jsonl"
    lines = raw_lines(site)
    copy.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    with pytest.raises(InputError, match=r"does not verify.*restore it"):
        load_own_ledger(copy, site.public)


def test_hash_is_of_canonical_json(site: Site) -> None:
    obj = json.loads(raw_lines(site)[2])
    reordered = dict(reversed(list(obj["entry"].items())))
    assert entry_hash(reordered) == obj["hash"]
