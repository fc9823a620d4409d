from pathlib import Path

import pytest

from fedglm.config import (
    CoordinatorConfig,
    FederationConfig,
    HospitalConfig,
    ModelConfig,
    PretrainConfig,
    SimulateConfig,
    UplinkConfig,
    load_config,
)
from fedglm.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("path", "cls"),
    [
        (ROOT / "server" / "coordinator.yaml", CoordinatorConfig),
        (ROOT / "clients" / "hospital.yaml", HospitalConfig),
        (ROOT / "bench" / "mtsamples-4sites.yaml", SimulateConfig),
        (ROOT / "bench" / "round_overhead.yaml", SimulateConfig),
        (ROOT / "bench" / "federated.yaml", FederationConfig),
        (ROOT / "server" / "pretrain.yaml", PretrainConfig),
        (ROOT / "bench" / "base_model.yaml", FederationConfig),
    ],
)
def test_every_shipped_yaml_loads(path: Path, cls: type) -> None:
    assert isinstance(load_config(path, cls), cls)


def test_every_shipped_yaml_is_listed_above() -> None:
    shipped = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.yaml") if ".venv" not in p.parts}
    assert shipped == {
        "server/coordinator.yaml",
        "clients/hospital.yaml",
        "bench/mtsamples-4sites.yaml",
        "bench/round_overhead.yaml",
        "bench/federated.yaml",
        "server/pretrain.yaml",
        "bench/base_model.yaml",
    }


def test_unknown_codec_lists_the_registry(tmp_path: Path) -> None:
    path = write(tmp_path, "federation:\n  compression:\n    uplink: {codec: zip}\n")
    with pytest.raises(
        InputError, match=r"compression.uplink.codec.*unknown codec 'zip'.*dense, fp16, topk, ternary, int8"
    ):
        load_config(path, CoordinatorConfig)
    path = write(tmp_path, "federation:\n  compression:\n    downlink: {density: 0}\n")
    with pytest.raises(InputError, match=r"compression\.downlink\.density"):
        load_config(path, CoordinatorConfig)


def test_density_warm_up_falls_geometrically() -> None:
    up = UplinkConfig(density=0.01, warmup_rounds=2, warmup_density=0.25)
    assert [up.density_for(r) for r in (1, 2, 3, 9)] == pytest.approx([0.25, 0.05, 0.01, 0.01])
    assert UplinkConfig(density=0.01).density_for(1) == 0.01


def test_unknown_key_names_key_and_allowed(tmp_path: Path) -> None:
    path = write(tmp_path, "federation:\n  rounds: 2\n  roundz: 3\n")
    with pytest.raises(InputError) as err:
        load_config(path, CoordinatorConfig)
    message = str(err.value)
    assert "unknown key 'federation.roundz'" in message
    assert "rounds" in message and str(path) in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("federation:\n  min_clients: 0\n", "federation.min_clients = 0"),
        ("federation:\n  train:\n    lr: -0.1\n", "federation.train.lr = -0.1"),
        ("port: 70000\n", "port = 70000"),
        ("federation:\n  rounds: many\n", "federation.rounds = 'many'"),
        ("federation:\n  train:\n    precision: fp8\n", "federation.train.precision = 'fp8'"),
        ("federation:\n  model:\n    d_model: 60\n    n_heads: 8\n", "multiple of n_heads"),
        ("federation:\n  train:\n    seq_len: 4096\n", "exceeds model.max_seq_len"),
        ("federation:\n  train:\n    local_epochs: 1\n", "exactly one of local_steps"),
    ],
)
def test_impossible_values_fail_at_load(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(InputError, match=expected.replace(".", r"\.").replace("(", r"\(")):
        load_config(write(tmp_path, text), CoordinatorConfig)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", CoordinatorConfig)
    with pytest.raises(InputError, match="invalid YAML at line 2"):
        load_config(write(tmp_path, "a: 1\n b: [\n"), CoordinatorConfig)
    with pytest.raises(InputError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"), CoordinatorConfig)


def test_missing_required_key(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="missing required key 'data'"):
        load_config(write(tmp_path, "site: a\ncoordinator: 127.0.0.1:9092\n"), HospitalConfig)


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    text = (
        "site: a\ncoordinator: 127.0.0.1:9092\nca_cert: certs/ca.crt\ndata:\n  path: notes\n"
        "privacy:\n  sample_rate: 0.05\n  signing_key: keys/site.key\n"
    )
    cfg = load_config(write(tmp_path, text), HospitalConfig)
    assert cfg.ca_cert == tmp_path / "certs" / "ca.crt"
    assert cfg.data.path == tmp_path / "notes"
    assert cfg.site_spec().signing_key() == tmp_path / "keys" / "site.key"


def test_preset_fills_sizes_and_explicit_keys_override() -> None:
    small = ModelConfig(preset="small")
    assert (small.d_model, small.n_layers) == (256, 4)
    custom = ModelConfig.model_validate({"preset": "small", "n_layers": 2})
    assert (custom.d_model, custom.n_layers) == (256, 2)


def test_configs_are_frozen() -> None:
    cfg = CoordinatorConfig()
    with pytest.raises(Exception, match="frozen"):
        cfg.port = 1  # type: ignore[misc]


def test_simulate_needs_enough_sites(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="min_clients"):
        load_config(
            write(tmp_path, "federation:\n  min_clients: 5\ngenerated:\n  sites: 3\n"),
            SimulateConfig,
        )
