"""Every user mistake: one line on stderr naming what is wrong, exit code 2, no traceback."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedglm.certs import CertPaths
from fedglm.cli.main import app
from fedglm.nodes import make_node_keys
from fedglm.privacy.keys import make_keys
from fedglm.processes import ManagedProcess, free_port
from fedglm.server.superlink import TLSFiles, start_superlink


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stderr


def assert_one_line(code: int, stderr: str, *fragments: str) -> None:
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedglm: error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def hospital(
    tmp_path: Path,
    base: Path,
    *,
    data: str = "notes.csv",
    field: str = "text",
    ca: Path | None = None,
    coordinator: str = "127.0.0.1:1",
    port: int | None = None,
) -> Path:
    (tmp_path / "notes.csv").write_text("text\nfirst note\nsecond note\nthird note\n")
    path = tmp_path / "h.yaml"
    path.write_text(
        f"site: h1\ncoordinator: {coordinator}\nruntime_port: {port or free_port()}\nbase: {base}\n"
        + (f"ca_cert: {ca}\n" if ca else "")
        + f"state_dir: state\ndata:\n  path: {data}\n  field: {field}\n"
        + "privacy:\n  sample_rate: 0.1\n"
    )
    return path


def test_config_typo(tmp_path: Path) -> None:
    config = tmp_path / "s.yaml"
    config.write_text("federation:\n  rouns: 2\n")
    assert_one_line(*run("simulate", "--config", str(config)), "unknown key 'federation.rouns'", "rounds")


def test_missing_config_file(tmp_path: Path) -> None:
    assert_one_line(*run("server", "--config", str(tmp_path / "none.yaml")), "does not exist")


def test_missing_data_file(tmp_path: Path, certs: CertPaths, tiny_base: Path) -> None:
    config = hospital(tmp_path, tiny_base, data="missing.csv", ca=certs.ca_cert)
    assert_one_line(*run("client", "--config", str(config)), "missing.csv does not exist")


def test_no_such_column(tmp_path: Path, certs: CertPaths, tiny_base: Path) -> None:
    config = hospital(tmp_path, tiny_base, field="note", ca=certs.ca_cert)
    assert_one_line(*run("client", "--config", str(config)), "no column 'note'", "columns are: text")


def test_record_not_utf8(tmp_path: Path, certs: CertPaths, tiny_base: Path) -> None:
    config = hospital(tmp_path, tiny_base, ca=certs.ca_cert)
    (tmp_path / "notes.csv").write_bytes(b"text\nok\n\xe9t\xe9\n")
    assert_one_line(*run("client", "--config", str(config)), "not valid UTF-8", "line 3")


def test_client_without_ca_or_insecure_off_loopback(tmp_path: Path, tiny_base: Path) -> None:
    assert_one_line(*run("client", "--config", str(hospital(tmp_path, tiny_base))), "set ca_cert")
    config = hospital(tmp_path, tiny_base, coordinator="10.1.2.3:9092")
    assert_one_line(*run("client", "--config", str(config), "--insecure"), "only allowed on a loopback")


def test_unreachable_coordinator_gives_up_when_asked(
    tmp_path: Path, certs: CertPaths, tiny_base: Path
) -> None:
    config = hospital(tmp_path, tiny_base, ca=certs.ca_cert, coordinator=f"127.0.0.1:{free_port()}")
    make_keys(tmp_path / "state", "ledger")
    code, stderr = run("client", "--config", str(config), "--give-up-after", "2")
    assert_one_line(code, stderr, "unreachable after")


def test_client_without_a_signing_key(tmp_path: Path, certs: CertPaths, tiny_base: Path) -> None:
    config = hospital(tmp_path, tiny_base, ca=certs.ca_cert)
    code, stderr = run("client", "--config", str(config))
    assert_one_line(code, stderr, "no signing key at", "fedglm keys --out")


def test_client_with_a_damaged_ledger(tmp_path: Path, certs: CertPaths, tiny_base: Path) -> None:
    config = hospital(tmp_path, tiny_base, ca=certs.ca_cert)
    make_keys(tmp_path / "state", "ledger")
    (tmp_path / "state" / "privacy").mkdir()
    (tmp_path / "state" / "privacy" / "ledger.jsonl").write_text('{"entry": ')
    code, stderr = run("client", "--config", str(config))
    assert_one_line(code, stderr, "does not verify", "line 1")


@pytest.mark.parametrize(
    ("privacy", "fragment"),
    [
        ("accountant: gdp", "privacy.accountant = 'gdp'"),
        ("delta: 0.01", "privacy.delta = 0.01"),
        ("epsilon: -1", "privacy.epsilon = -1"),
        ("epsilon: 1000", "privacy.epsilon = 1000"),
        ("mode: functorch", "privacy.mode"),
        ("unit: window", "privacy.unit"),
    ],
)
def test_bad_privacy_settings(tmp_path: Path, privacy: str, fragment: str, tiny_base: Path) -> None:
    config = hospital(tmp_path, tiny_base)
    config.write_text(config.read_text() + f"  {privacy}\n")
    assert_one_line(*run("client", "--config", str(config)), fragment)


def test_sampling_rate_that_would_publish_the_record_count(tmp_path: Path, tiny_base: Path) -> None:
    config = hospital(tmp_path, tiny_base)
    config.write_text(config.read_text().replace("privacy:\n  sample_rate: 0.1\n", ""))
    assert_one_line(*run("client", "--config", str(config)), "set privacy.sample_rate", "share.record_count")


def test_runtime_port_in_use(tmp_path: Path, certs: CertPaths, tiny_base: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = hospital(tmp_path, tiny_base, ca=certs.ca_cert, port=busy.getsockname()[1])
        assert_one_line(*run("client", "--config", str(config)), "already in use")


def test_server_needs_tls_or_loopback_insecure(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("host: 0.0.0.0\n")
    assert_one_line(*run("server", "--config", str(config)), "no tls section")
    assert_one_line(*run("server", "--config", str(config), "--insecure"), "only allowed on a loopback")


def test_certs_and_partition_bad_options(tmp_path: Path) -> None:
    assert_one_line(*run("certs", "--out", str(tmp_path / "c"), "--host", "a b"), "not an IP address")
    csv = tmp_path / "c.csv"
    csv.write_text("transcription,kind\nx,a\n")
    assert_one_line(
        *run("partition", str(csv), "--by", "specialty", "--sites", "2", "--out", str(tmp_path / "o")),
        "no column 'specialty'",
    )


@pytest.fixture
def superlink(tmp_path: Path, certs: CertPaths) -> Iterator[int]:
    port = free_port()
    process: ManagedProcess = start_superlink(
        host="127.0.0.1",
        port=port,
        tls=TLSFiles(certs.ca_cert, certs.server_cert, certs.server_key),
        home=tmp_path / "link",
    )
    try:
        yield port
    finally:
        process.stop()


@pytest.mark.integration
def test_wrong_ca_certificate(
    tmp_path: Path, superlink: int, other_certs: CertPaths, tiny_base: Path
) -> None:
    config = hospital(tmp_path, tiny_base, ca=other_certs.ca_cert, coordinator=f"127.0.0.1:{superlink}")
    make_keys(tmp_path / "state", "ledger")
    assert_one_line(*run("client", "--config", str(config)), "does not verify the coordinator")


@pytest.mark.integration
def test_second_server_on_a_port_in_use(
    tmp_path: Path, superlink: int, certs: CertPaths, tiny_base: Path
) -> None:
    config = tmp_path / "c.yaml"
    make_node_keys(tmp_path / "h1")
    config.write_text(
        f"host: 127.0.0.1\nport: {superlink}\nout_dir: run\ntls: {{ca_cert: {certs.ca_cert}, "
        f"server_cert: {certs.server_cert}, server_key: {certs.server_key}}}\n"
        "sites: [{name: h1, node_key: h1/node.pub}]\n"
        f"federation: {{base: {tiny_base}}}\n"
    )
    assert_one_line(*run("server", "--config", str(config)), "already in use")


def test_pretrain_bad_inputs(tmp_path: Path) -> None:
    config = tmp_path / "p.yaml"
    config.write_text(f"text:\n  - {{path: {tmp_path / 'missing.jsonl'}, field: answer}}\nout_dir: out\n")
    assert_one_line(*run("pretrain", "--config", str(config)), "missing.jsonl", "does not exist")
    config.write_text("model: {preset: tiny}\nseq_len: 512\n")
    assert_one_line(
        *run("pretrain", "--config", str(config)), "seq_len (512) exceeds the tiny preset's 256 positions"
    )


def test_a_server_config_without_a_usable_base(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("host: 127.0.0.1\n")
    assert_one_line(*run("server", "--config", str(config), "--insecure"), "federation.base is not set")
    config.write_text("host: 127.0.0.1\nfederation:\n  base: nowhere/model\n")
    assert_one_line(
        *run("server", "--config", str(config), "--insecure"),
        f"model folder {tmp_path / 'nowhere' / 'model'}",
    )
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "base.pt").write_bytes(b"pickled")  # the retired format: never unpickled
    config.write_text("host: 127.0.0.1\nfederation:\n  base: old\n")
    assert_one_line(*run("server", "--config", str(config), "--insecure"), "no config.json")


def test_adapters_the_base_lacks_are_refused_before_the_superlink_starts(
    tmp_path: Path, tiny_base: Path
) -> None:
    port = free_port()
    config = tmp_path / "c.yaml"
    config.write_text(
        f"host: 127.0.0.1\nport: {port}\nfederation:\n  base: {tiny_base}\n"
        "  train: {adapters: lora, lora_targets: [c_attn]}\n"
    )
    assert_one_line(*run("server", "--config", str(config), "--insecure"), "train.lora_targets", "c_attn")
    with socket.socket() as probe:  # nothing was left listening
        probe.bind(("127.0.0.1", port))
    simulated = tmp_path / "s.yaml"
    simulated.write_text(
        f"federation:\n  base: {tiny_base}\n  train: {{adapters: lora, lora_targets: [c_attn]}}\n"
    )
    assert_one_line(
        *run("simulate", "--config", str(simulated), "--out", str(tmp_path / "run")), "train.lora_targets"
    )
    assert not (tmp_path / "run").exists()


def test_a_hospital_with_a_damaged_base_folder_stops_at_startup(tmp_path: Path, tiny_base: Path) -> None:
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for path in tiny_base.iterdir():
        (damaged / path.name).write_bytes(path.read_bytes())
    (damaged / "model.safetensors").write_bytes(b"not safetensors")
    config = hospital(tmp_path, damaged)
    assert_one_line(*run("client", "--config", str(config), "--insecure"), str(damaged), "safetensors")


def test_a_hospital_config_must_name_its_base_folder(tmp_path: Path, tiny_base: Path) -> None:
    path = hospital(tmp_path, tiny_base)
    path.write_text(path.read_text().replace(f"base: {tiny_base}\n", ""))
    assert_one_line(*run("client", "--config", str(path)), "missing required key 'base'")
    # the retired pin: a site now checks the announced hash against its own folder's
    path.write_text(path.read_text() + f"base: {tiny_base}\nbase_hash: {'ab' * 32}\n")
    assert_one_line(*run("client", "--config", str(path)), "unknown key 'base_hash'")


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    """367 bytes of nested aliases would expand to billions of nodes when validated."""
    config = tmp_path / "bomb.yaml"
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for name, prev in zip("bcdefgh", "abcdefg", strict=True):
        lines.append(f"{name}: &{name} [{','.join([f'*{prev}'] * 9)}]")
    config.write_text("\n".join(lines) + "\nfederation: *h\n")
    assert_one_line(*run("server", "--config", str(config)), "aliases (*name) are not allowed")


@pytest.mark.parametrize(
    "args",
    [
        ["certs", "--out", "{file}", "--host", "127.0.0.1"],
        ["keys", "--out", "{file}"],
        ["partition", "{csv}", "--by", "label", "--sites", "2", "--out", "{file}"],
    ],
)
def test_an_out_folder_that_is_a_file_is_refused(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "taken").write_text("not a folder")
    (tmp_path / "c.csv").write_text("transcription,label\na,x\nb,y\n")
    paths = {"file": str(tmp_path / "taken"), "csv": str(tmp_path / "c.csv")}
    assert_one_line(*run(*(a.format(**paths) for a in args)), "is an existing file, not a folder")
    assert (tmp_path / "taken").read_text() == "not a folder"


def test_absurd_certificate_validity_and_key_names_are_refused(tmp_path: Path) -> None:
    assert_one_line(
        *run("certs", "--out", str(tmp_path / "c"), "--host", "127.0.0.1", "--days", "99999999"),
        "--days 99999999",
    )
    assert_one_line(*run("keys", "--out", str(tmp_path / "k"), "--name", "../../x"), "no path separators")
    assert not (tmp_path / "x.key").exists() and not (tmp_path.parent / "x.key").exists()
