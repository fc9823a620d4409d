"""`fedglm audit` on a real ledger: exit 0 when everything holds and is countersigned, 3 when it
holds but was not checked against the coordinator's receipts, 1 when anything fails, 2 for
unreadable input; a table, JSON, and a PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from fedglm.atomic import append_line
from fedglm.cli.main import app
from fedglm.config import PrivacyConfig
from fedglm.privacy.accounting import Release
from fedglm.privacy.audit import dp_accounting_epsilon
from fedglm.privacy.keys import make_keys, public_pem
from fedglm.privacy.ledger import FORMAT_2, GENESIS, sign_line
from fedglm.privacy.receipts import make_receipt
from tests.privacy.helpers import Site, ledger_of, new_site, release, release_metrics


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    site = ledger_of(tmp_path_factory.mktemp("audit"), rounds=3)
    (site.state_dir / "receipt.pub").write_text(public_pem(site.server_key.public_key()))
    return site


def audit(site: Site, *extra: str, ledger: Path | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(
        app, ["audit", str(ledger or site.ledger), "--public-key", str(site.state_dir / "ledger.pub"), *extra]
    )
    return result.exit_code, result.stdout, result.stderr


def test_a_sound_ledger_passes_with_receipts_a_table_json_and_a_plot(site: Site, tmp_path: Path) -> None:
    png = tmp_path / "eps.png"
    server = ["--server-key", str(site.state_dir / "receipt.pub"), "--receipts", str(site.receipts)]
    code, out, _ = audit(site, *server, "--plot", str(png))
    assert code == 0, out
    assert "OK, verified against the coordinator: 3 entries" in out and "every entry countersigned" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = audit(site, *server, "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["verified_against_coordinator"]
    assert [r["receipt"] for r in report["rows"]] == ["ok"] * 3
    for row in report["rows"]:
        assert abs(row["claimed"] - row["pld"]) <= 0.01 * row["pld"]
        assert row["rdp"] > row["pld"]  # RDP is the looser bound


def test_an_exceeded_budget_fails(site: Site) -> None:
    code, _, err = audit(site, "--budget", "0.5")
    assert code == 1 and "exceeds the budget of 0.5" in err


def _re_signed(site: Site, tmp_path: Path, **changes: object) -> Path:
    """The site's ledger with its last entry changed and re-signed by the site itself."""
    lines = site.ledger.read_text().splitlines()
    entry = dict(json.loads(lines[-1])["entry"], **changes)
    lines[-1] = json.dumps(sign_line(entry, site.key))
    forged = tmp_path / "ledger.jsonl"
    forged.write_text("\n".join(lines) + "\n")
    return forged


def test_a_claim_below_the_recomputation_fails_and_one_above_passes(site: Site, tmp_path: Path) -> None:
    claimed = json.loads(site.ledger.read_text().splitlines()[-1])["entry"]["epsilon"]
    code, _, err = audit(site, ledger=_re_signed(site, tmp_path, epsilon=claimed * 0.99))
    assert code == 1 and "below dp-accounting PLD's" in err and "own error" in err
    # a conservative claim (as Opacus' RDP is, 11-14% above PLD) is not a failure: it is reported
    code, out, err = audit(site, "--json", ledger=_re_signed(site, tmp_path, epsilon=claimed * 1.14))
    assert code == 3, err
    assert json.loads(out)["rows"][-1]["difference"] == pytest.approx(0.14, abs=0.01)


def test_a_rewritten_entry_is_caught_by_its_receipt(site: Site, tmp_path: Path) -> None:
    """The site re-signs its last entry with its own key: the chain holds, the receipt does not."""
    lines = site.ledger.read_text().splitlines()
    entry = dict(json.loads(lines[-1])["entry"], update_sent="ee" * 32)
    lines[-1] = json.dumps(sign_line(entry, site.key))
    forged = tmp_path / "ledger.jsonl"
    forged.write_text("\n".join(lines) + "\n")
    code, out, err = audit(site, ledger=forged)  # without the coordinator's receipts it looks sound,
    assert code == 3 and "NOT VERIFIED against the coordinator" in out  # and the verdict says so
    assert "NOT verified against the coordinator" in err
    code, _, err = audit(
        site,
        "--server-key",
        str(site.state_dir / "receipt.pub"),
        "--receipts",
        str(site.receipts),
        ledger=forged,
    )
    assert code == 1 and "countersigned a different entry" in err


def test_a_forged_receipt_fails(site: Site, tmp_path: Path) -> None:
    receipts = tmp_path / "receipts.jsonl"
    first = json.loads(site.receipts.read_text().splitlines()[0])
    first["receipt"]["epsilon"] = 0.0
    receipts.write_text(json.dumps(first) + "\n")
    code, _, err = audit(
        site, "--server-key", str(site.state_dir / "receipt.pub"), "--receipts", str(receipts)
    )
    assert code == 1 and "does not verify with the coordinator's public key" in err


def test_the_wrong_public_key_fails(site: Site, tmp_path: Path) -> None:
    _, other = make_keys(tmp_path, "other")
    result = CliRunner().invoke(app, ["audit", str(site.ledger), "--public-key", str(other)])
    assert result.exit_code == 1 and "not the given public key" in result.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["missing.jsonl", "--public-key", "{pub}"], "does not exist"),
        (["{ledger}", "--public-key", "missing.pub"], "public key file missing.pub does not exist"),
        (["{ledger}", "--public-key", "{ledger}"], "not a PEM public key"),
        (["{binary}", "--public-key", "{pub}"], "not UTF-8"),
        (["{empty}", "--public-key", "{pub}"], "holds no entries"),
        (["{ledger}", "--public-key", "{pub}", "--budget", "-1"], "--budget -1"),
        (
            ["{ledger}", "--public-key", "{pub}", "--server-key", "{pub}", "--receipts", "none.jsonl"],
            "does not exist",
        ),
    ],
)
def test_unreadable_input_exits_2_with_one_line(
    site: Site, tmp_path: Path, args: list[str], fragment: str
) -> None:
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "empty").write_text("")
    paths = {
        "pub": str(site.state_dir / "ledger.pub"),
        "ledger": str(site.ledger),
        "binary": str(tmp_path / "binary"),
        "empty": str(tmp_path / "empty"),
    }
    result = CliRunner().invoke(app, ["audit", *(a.format(**paths) for a in args)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in result.stderr


def test_keys_refuses_to_overwrite_a_site_key(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["keys", "--out", str(tmp_path)]).exit_code == 0
    assert (tmp_path / "ledger.key").stat().st_mode & 0o777 == 0o600
    again = runner.invoke(app, ["keys", "--out", str(tmp_path)])
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_a_truncated_ledger_fails_with_the_line(site: Site, tmp_path: Path) -> None:
    text = site.ledger.read_text()
    cut = tmp_path / "cut.jsonl"
    cut.write_text(text[:-30])
    code, _, err = audit(site, ledger=cut)
    assert code == 1 and "line 3" in err


def test_lines_re_signed_with_another_key_fail(site: Site, tmp_path: Path) -> None:
    other = Ed25519PrivateKey.generate()
    lines = site.ledger.read_text().splitlines()
    lines[1] = json.dumps(sign_line(json.loads(lines[1])["entry"], other))
    forged = tmp_path / "forged.jsonl"
    forged.write_text("\n".join(lines) + "\n")
    code, _, err = audit(site, ledger=forged)
    assert code == 1 and "line 2" in err


@pytest.mark.parametrize(("field", "value"), [("q", 2.0), ("sigma", -1.0), ("sequence", -1), ("steps", 0)])
def test_a_value_no_accountant_takes_is_a_malformed_line_not_a_traceback(
    site: Site, tmp_path: Path, field: str, value: float
) -> None:
    code, _, err = audit(site, ledger=_re_signed(site, tmp_path, **{field: value}))
    assert code == 1 and (f"field '{field}'" in err or "must be positive" in err)
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "bad", ['{"entry": ' + "9" * 5000 + "}", "[" * 100_000 + "]" * 100_000], ids=["huge-integer", "deep"]
)
def test_a_hostile_line_fails_the_audit_with_one_line(site: Site, tmp_path: Path, bad: str) -> None:
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text(site.ledger.read_text() + bad + "\n")
    code, _, err = audit(site, ledger=ledger)
    assert code == 1 and "line 4: not one unambiguous JSON object" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def with_metrics(tmp_path_factory: pytest.TempPathFactory) -> Site:
    """Three rounds, each followed by a release of the validation metrics, and the base's first."""
    site = new_site(tmp_path_factory.mktemp("audit-metrics"))
    privacy = PrivacyConfig(noise_multiplier=1.0, epsilon=50.0, sample_rate=0.05)
    lines = [release_metrics(site, privacy, server_round=0)]
    for server_round in (1, 2, 3):
        lines += [
            release(site, privacy, server_round=server_round),
            release_metrics(site, privacy, server_round=server_round),
        ]
    for line in lines:
        assert line is not None
        append_line(site.receipts, json.dumps(make_receipt(line, site.server_key)))
    (site.state_dir / "receipt.pub").write_text(public_pem(site.server_key.public_key()))
    return site


def test_metric_releases_are_recomputed_and_their_cost_reported(with_metrics: Site) -> None:
    site = with_metrics
    server = ["--server-key", str(site.state_dir / "receipt.pub"), "--receipts", str(site.receipts)]
    code, out, _ = audit(site, *server)
    assert code == 0, out
    assert "4 release(s) of validation metrics under DP" in out
    code, out, _ = audit(site, *server, "--json")
    report = json.loads(out)
    assert [r["release"] for r in report["rows"]] == ["metrics", "update"] * 3 + ["metrics"]
    for row in report["rows"]:
        assert abs(row["claimed"] - row["pld"]) <= 0.01 * row["pld"]
    updates = [r for r in report["rows"] if r["release"] == "update"]
    alone = dp_accounting_epsilon([Release(r["sigma"], r["q"], r["steps"]) for r in updates], 1e-5, "pld")
    assert report["epsilon_without_metrics"] == pytest.approx(alone)
    assert alone < report["rows"][-1]["pld"]


def test_a_metric_release_claiming_too_little_fails(with_metrics: Site, tmp_path: Path) -> None:
    claimed = json.loads(with_metrics.ledger.read_text().splitlines()[-1])["entry"]["epsilon"]
    code, _, err = audit(with_metrics, ledger=_re_signed(with_metrics, tmp_path, epsilon=claimed * 0.97))
    assert code == 1 and "below dp-accounting PLD's" in err


def test_a_ledger_of_format_2_still_audits(site: Site, tmp_path: Path) -> None:
    """Lines written before metric releases existed: updates, without `release` and `metrics`."""
    old = []
    prev = GENESIS
    for raw in site.ledger.read_text().splitlines():
        entry = json.loads(raw)["entry"]
        entry = {k: v for k, v in entry.items() if k not in ("release", "metrics")}
        entry |= {"format": FORMAT_2, "prev": prev}
        signed = sign_line(entry, site.key)
        prev = signed["hash"]
        old.append(json.dumps(signed))
    path = tmp_path / "old.jsonl"
    path.write_text("\n".join(old) + "\n")
    code, out, err = audit(site, "--json", ledger=path)
    assert code == 3, err  # sound, but the receipts countersigned the format-3 lines
    assert [r["release"] for r in json.loads(out)["rows"]] == ["update"] * 3
