from pathlib import Path

import pytest

from fedglm.config import (
    CoordinatorConfig,
    FederationConfig,
    HospitalConfig,
    PretrainConfig,
    PretrainModelConfig,
    SimulateConfig,
    TrainConfig,
    UplinkConfig,
    load_config,
)
from fedglm.errors import InputError
from fedglm.models.base import BaseModel, open_run_base
from fedglm.models.families import FAMILIES

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
        ("federation:\n  train:\n    lora_targets: [qkv]\n", "federation.train.lora_targets.0 = 'qkv'"),
        ("federation:\n  train:\n    lora_targets: [q_proj, q_proj]\n", "lists a projection twice"),
        # the retired decoder's shape keys: the shape is the base folder's now
        (
            "federation:\n  model:\n    preset: tiny\n",
            "unknown key 'federation.model.preset'; allowed here: init_seed",
        ),
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
        load_config(write(tmp_path, "site: a\ncoordinator: 127.0.0.1:9092\nbase: model\n"), HospitalConfig)


def test_a_hospital_must_name_its_base_model_folder(tmp_path: Path) -> None:
    text = "site: a\ncoordinator: 127.0.0.1:9092\ndata:\n  path: notes\n"
    with pytest.raises(InputError) as err:
        load_config(write(tmp_path, text), HospitalConfig)
    assert str(err.value) == f"{tmp_path / 'c.yaml'}: missing required key 'base'"
    # The retired pin is refused by name: the folder's own hash is what a site checks now.
    with pytest.raises(InputError, match="unknown key 'base_hash'"):
        load_config(write(tmp_path, text + f"base: model\nbase_hash: {'ab' * 32}\n"), HospitalConfig)


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    text = (
        "site: a\ncoordinator: 127.0.0.1:9092\nca_cert: certs/ca.crt\ndata:\n  path: notes\n"
        "privacy:\n  sample_rate: 0.05\n  signing_key: keys/site.key\nbase: models/glm4\n"
    )
    cfg = load_config(write(tmp_path, text), HospitalConfig)
    assert cfg.ca_cert == tmp_path / "certs" / "ca.crt"
    assert cfg.base == cfg.site_spec().base == tmp_path / "models" / "glm4"
    assert cfg.data.path == tmp_path / "notes"
    assert cfg.site_spec().signing_key() == tmp_path / "keys" / "site.key"


def test_a_pretrain_preset_bounds_its_window() -> None:
    assert PretrainModelConfig(preset="small").max_positions == 512
    assert PretrainConfig(model=PretrainModelConfig(preset="small"), seq_len=512).seq_len == 512
    with pytest.raises(ValueError, match="seq_len \\(512\\) exceeds the tiny preset's 256 positions"):
        PretrainConfig(seq_len=512)


def test_the_run_base_is_required_and_bounds_the_window(tiny_base: Path) -> None:
    with pytest.raises(InputError, match=r"federation\.base is not set"):
        open_run_base(None, 128)
    with pytest.raises(
        InputError, match=r"train.seq_len \(4096\) exceeds the 256 positions of the base model"
    ):
        open_run_base(tiny_base, 4096)
    assert open_run_base(tiny_base, 256).shape.heads == 4


def test_lora_targets_default_to_every_projection_of_the_family() -> None:
    lora = TrainConfig(adapters="lora")
    glm4, llama = FAMILIES["Glm4ForCausalLM"], FAMILIES["LlamaForCausalLM"]
    spec = lora.lora_spec(5, glm4)
    assert spec is not None and spec.seed == 6  # A is drawn from init_seed + 1 by every party
    assert spec.targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")
    llama_spec = lora.lora_spec(5, llama)
    assert llama_spec is not None
    assert llama_spec.targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert TrainConfig().lora_spec(5, glm4) is None  # full fine-tuning: no adapters


def test_lora_targets_the_base_family_lacks_are_refused_naming_the_field(tiny_base: Path) -> None:
    base = BaseModel.open(tiny_base)  # GLM-4: one fused gate_up_proj, no gate_proj
    spec = TrainConfig(adapters="lora", lora_targets=["q_proj", "gate_proj"]).lora_spec(0, base.family)
    with pytest.raises(InputError) as err:
        base.check_lora(spec)
    assert str(err.value) == (
        "train.lora_targets: lora target 'gate_proj' is not a projection of Glm4ForCausalLM "
        "(it has q_proj, k_proj, v_proj, o_proj, gate_up_proj, down_proj)"
    )
    with pytest.raises(InputError, match=r"train\.lora_targets: lora target 'gate_proj'"):
        base.build(lora=spec)
    base.check_lora(TrainConfig(adapters="lora", lora_targets=["gate_up_proj"]).lora_spec(0, base.family))


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
