"""The quick `fedglm` commands end to end through the CLI (keys, certs, partition, audit, --help):
what they write, and one line with exit code 2 for what they refuse. No run is started."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import stat
from pathlib import Path

import pytest
from click.testing import Result
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from fedglm.certs import MAX_DAYS
from fedglm.cli.main import app
from fedglm.nodes import read_node_public_key
from fedglm.privacy.keys import key_id, load_private_key, load_public_key


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def assert_refused(result: Result, *fragments: str) -> None:
    """Exit code 2 and exactly one `fedglm: error:` line on stderr naming every fragment."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedglm: error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def _flat(text: str) -> str:
    """Output without line breaks (the console wraps long lines)."""
    return "".join(text.split())


# --- keys ---------------------------------------------------------------------------------------


def test_keys_makes_a_ledger_key_pair_and_prints_its_key_id(tmp_path: Path) -> None:
    out = tmp_path / "state"
    result = invoke("keys", "--out", str(out))
    assert result.exit_code == 0, result.output
    private, public = out / "ledger.key", out / "ledger.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert load_private_key(private).public_key() == load_public_key(public)
    assert key_id(load_public_key(public)) in _flat(result.stdout)

    receipt = invoke("keys", "--out", str(out), "--name", "receipt")
    assert receipt.exit_code == 0, receipt.output
    assert (out / "receipt.key").is_file() and (out / "receipt.pub").is_file()


def test_keys_refuses_to_replace_a_key_unless_told(tmp_path: Path) -> None:
    assert invoke("keys", "--out", str(tmp_path)).exit_code == 0
    before = (tmp_path / "ledger.key").read_bytes()
    assert_refused(invoke("keys", "--out", str(tmp_path)), "ledger.key already exists", "--overwrite")
    assert (tmp_path / "ledger.key").read_bytes() == before

    replaced = invoke("keys", "--out", str(tmp_path), "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert (tmp_path / "ledger.key").read_bytes() != before


def test_keys_node_makes_the_supernode_key_pair(tmp_path: Path) -> None:
    result = invoke("keys", "--out", str(tmp_path), "--node")
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((tmp_path / "node.key").stat().st_mode) == 0o600
    assert read_node_public_key(tmp_path / "node.pub", "node_key").startswith(b"-----BEGIN PUBLIC KEY")
    assert not (tmp_path / "ledger.key").exists()
    assert "coordinator" in result.stdout

    before = (tmp_path / "node.key").read_bytes()
    assert_refused(invoke("keys", "--out", str(tmp_path), "--node"), "node.key already exists")
    assert (tmp_path / "node.key").read_bytes() == before


# --- certs --------------------------------------------------------------------------------------


def test_certs_makes_a_ca_and_a_server_certificate_for_the_hosts(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    result = invoke(
        "certs", "--out", str(out), "--host", "10.0.0.5", "--host", "coord.example", "--days", "30"
    )
    assert result.exit_code == 0, result.output
    for name in ("ca.crt", "ca.key", "server.pem", "server.key"):
        assert (out / name).is_file(), name
        assert name in _flat(result.stdout)
    for name in ("ca.key", "server.key"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600

    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("127.0.0.1"),
    }
    assert set(names.get_values_for_type(x509.DNSName)) == {"coord.example", "localhost"}
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usage
    days_left = server.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=29) < days_left <= dt.timedelta(days=30)


def test_certs_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    assert invoke("certs", "--out", str(tmp_path), "--host", "127.0.0.1").exit_code == 0
    ca_before = (tmp_path / "ca.crt").read_bytes()
    assert_refused(
        invoke("certs", "--out", str(tmp_path), "--host", "127.0.0.1"), "already exists", "--force"
    )
    assert (tmp_path / "ca.crt").read_bytes() == ca_before
    assert invoke("certs", "--out", str(tmp_path), "--host", "127.0.0.1", "--force").exit_code == 0
    assert (tmp_path / "ca.crt").read_bytes() != ca_before


@pytest.mark.parametrize("days", [0, -5, MAX_DAYS + 1])
def test_certs_refuses_a_validity_out_of_range(tmp_path: Path, days: int) -> None:
    out = tmp_path / "c"
    assert_refused(
        invoke("certs", "--out", str(out), "--host", "127.0.0.1", "--days", str(days)),
        f"--days {days}: must be from 1 to {MAX_DAYS}",
    )
    assert not out.exists()


# --- partition ----------------------------------------------------------------------------------


def _corpus(path: Path) -> Path:
    rows = [
        ("cardio note 1", "Cardiology"),
        ("cardio note 2", "Cardiology"),
        ("cardio note 3", "Cardiology"),
        ("shared note", "Cardiology"),
        ("shared note", "Neurology"),  # listed twice: kept once, under its rarer label
        ("neuro note 1", "Neurology"),
        ("ortho note 1", "Orthopedics"),
        ("ortho note 2", "Orthopedics"),
        ("   ", "Orthopedics"),  # empty text: left out
    ]
    path.write_text("text,specialty\n" + "".join(f'"{t}",{label}\n' for t, label in rows), encoding="utf-8")
    return path


def test_partition_deals_whole_specialties_to_sites(tmp_path: Path) -> None:
    source, out = _corpus(tmp_path / "notes.csv"), tmp_path / "sites"
    result = invoke("partition", str(source), "--by", "specialty", "--sites", "2", "--out", str(out),
                    "--text-column", "text")  # fmt: skip
    assert result.exit_code == 0, result.output

    sites = [
        [json.loads(line) for line in (out / f"site-{i}.jsonl").read_text().splitlines()] for i in (1, 2)
    ]
    texts = [r["text"] for site in sites for r in site]
    assert sorted(texts) == sorted({"cardio note 1", "cardio note 2", "cardio note 3", "shared note",
                                    "neuro note 1", "ortho note 1", "ortho note 2"})  # fmt: skip
    labels = [{r["label"] for r in site} for site in sites]
    assert not labels[0] & labels[1]  # a specialty lives at one site only
    assert {"text": "shared note", "label": "Neurology"} in sites[0] + sites[1]
    assert sorted(len(site) for site in sites) == [3, 4]  # balanced: Cardiology | Neurology + Orthopedics

    summary = json.loads((out / "partition.json").read_text())
    assert summary["rows"] == 9 and summary["distinct_texts"] == 7
    assert [s["records"] for s in summary["sites"]] == [len(site) for site in sites]
    for i, site in enumerate(sites, start=1):
        assert f"site-{i}.jsonl: {len(site)} records" in result.stdout


def test_partition_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    source, out = _corpus(tmp_path / "notes.csv"), tmp_path / "sites"
    common = ["--by", "specialty", "--out", str(out), "--text-column", "text"]
    assert_refused(invoke("partition", str(source), *common, "--sites", "4"), "only 3 label(s)", "4 sites")
    assert_refused(invoke("partition", str(source), *common, "--sites", "0"), "--sites 0: must be at least 1")
    missing = tmp_path / "missing.csv"
    assert_refused(invoke("partition", str(missing), *common, "--sites", "2"), f"{missing} does not exist")
    no_label = ["--out", str(out), "--text-field", "text", "--sites", "2"]
    assert_refused(invoke("partition", str(source), *no_label), "--by is required")
    assert_refused(
        invoke("partition", str(source), *no_label, "--by", "x", "--format", "xml"), "--format xml"
    )
    assert not out.exists()


def test_partition_reads_a_jsonl_corpus_by_its_fields(tmp_path: Path) -> None:
    source, out = tmp_path / "qa.jsonl", tmp_path / "sites"
    rows = [
        {"source": source_name, "answer": f"{source_name} answer {i}"}
        for source_name in ("GARD", "GHR")
        for i in range(3)
    ]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = ["--by", "source", "--sites", "2", "--out", str(out)]
    assert_refused(
        invoke("partition", str(source), *common),
        "no field 'transcription'",
        "its fields are: source, answer",
    )
    result = invoke("partition", str(source), *common, "--text-field", "answer")
    assert result.exit_code == 0, result.output
    assert (
        "site-1.jsonl: 3 records (GARD)" in result.stdout and "site-2.jsonl: 3 records (GHR)" in result.stdout
    )


# --- audit --------------------------------------------------------------------------------------


def test_audit_of_a_missing_ledger_or_key_is_refused_in_one_line(tmp_path: Path) -> None:
    assert invoke("keys", "--out", str(tmp_path)).exit_code == 0
    ledger = tmp_path / "privacy" / "ledger.jsonl"
    assert_refused(
        invoke("audit", str(ledger), "--public-key", str(tmp_path / "ledger.pub")),
        f"ledger {ledger} does not exist",
    )
    (tmp_path / "privacy").mkdir()
    ledger.write_text("")
    missing_key = tmp_path / "nobody.pub"
    assert_refused(
        invoke("audit", str(ledger), "--public-key", str(missing_key)),
        f"public key file {missing_key} does not exist",
    )


# --- --help -------------------------------------------------------------------------------------

COMMANDS = [
    "simulate", "server", "pretrain", "client", "certs", "partition", "keys", "audit", "distill", "export",
    "generate",
]  # fmt: skip


def test_every_command_is_listed() -> None:
    assert sorted(c.name or "" for c in app.registered_commands) == sorted(COMMANDS)
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout and command in result.stdout
    assert result.stderr == ""
