"""The round protocol: one writer, one reader, every key checked once."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, RecordDict

from fedglm.config import FederationConfig, LinkConfig, ModelConfig, TrainConfig
from fedglm.errors import InputError
from fedglm.payload import RECEIPT_KEY, PayloadError
from fedglm.privacy.metric_release import Window
from fedglm.protocol import (
    BASE_HASH_KEY,
    CENTRE_KEY,
    MASK_KEY,
    RADIUS_KEY,
    RoundConfig,
    read_receipts,
    receipts_record,
)


def full_config(**changes: object) -> RoundConfig:
    train = TrainConfig(
        local_steps=None,
        local_epochs=0.5,
        grad_clip=None,
        adapters="lora",
        lora_targets=["q_proj", "down_proj"],
    )
    fed = FederationConfig(model=ModelConfig(init_seed=3), train=train)
    settings = {
        "model": fed.model,
        "train": fed.train,
        "seed": 7,
        "server_round": 3,
        "rounds": 10,
        "run_key": "0123abcd",
        "uplink": LinkConfig(codec="topk", density=0.05, selection="per-tensor"),
        "mask": '{"heads": [[0, 1]], "channels": [[0]]}',
        "base_hash": "ab" * 32,
        "metrics_window": Window((6.5, 3.25), (2.0, 1.0)),
    }
    settings.update(changes)
    return RoundConfig(**settings)  # type: ignore[arg-type]


def test_a_round_config_round_trips_including_nulls() -> None:
    config = full_config()
    record = config.to_record()
    assert all(v is not None for v in record.values())  # a ConfigRecord holds no None
    assert RoundConfig.from_record(record) == config
    assert config.train.lora_targets == ["q_proj", "down_proj"]
    # Unset LoRA targets (every projection of the base's family) stay unset on the way.
    default = full_config(train=TrainConfig(adapters="lora"))
    assert "train.lora_targets" not in default.to_record()
    assert RoundConfig.from_record(default.to_record()).train.lora_targets is None


def test_the_wire_keys_stay_what_sites_of_earlier_releases_read() -> None:
    record = full_config().to_record()
    assert {
        "seed",
        "server-round",
        "rounds",
        "run-key",
        MASK_KEY,
        BASE_HASH_KEY,
        CENTRE_KEY,
        RADIUS_KEY,
    } <= set(record)
    assert {"uplink.codec", "uplink.density", "uplink.selection", "model.init_seed", "train.lr"} <= set(
        record
    )


def test_a_stock_flower_config_reads_with_defaults() -> None:
    """Flower's stock FedAvg sends model/train/seed and its own server-round only."""
    record = RoundConfig(model=ModelConfig(), train=TrainConfig(), seed=1).to_record()
    record["server-round"] = 2
    config = RoundConfig.from_record(record)
    assert (config.server_round, config.rounds, config.run_key, config.uplink, config.mask) == (
        2,
        1,
        None,
        None,
        "",
    )
    assert config.metrics_window is None  # no DP metrics asked for


@pytest.mark.parametrize(
    ("key", "value", "error", "match"),
    [
        ("seed", "7", PayloadError, "config 'seed' is '7', expected an integer"),
        ("server-round", True, PayloadError, "config 'server-round' is True"),
        ("run-key", 5, PayloadError, "config 'run-key' is int, expected a string"),
        (MASK_KEY, 5, PayloadError, "config 'prune.mask' is int"),
        (BASE_HASH_KEY, "AB" * 32, PayloadError, "expected 64 hex digits"),
        ("train.lr", float("inf"), InputError, "lr = inf"),
        ("uplink.codec", "zip", InputError, "codec"),
        ("model.init_seed", "x", InputError, "init_seed"),
        ("train.lora_targets", ["qkv"], InputError, "lora_targets"),
        # a coordinator still describing the retired decoder's shape is refused, not half-read
        ("model.d_model", 64, InputError, "unknown key 'd_model'"),
        # a window a site cannot use for its metric release
        (CENTRE_KEY, [1.0], PayloadError, "lists of two numbers"),
        (RADIUS_KEY, [0.0, 1.0], PayloadError, "radii in"),
        (CENTRE_KEY, [float("nan"), 1.0], PayloadError, "finite"),
    ],
)
def test_a_bad_key_is_named(key: str, value: object, error: type[Exception], match: str) -> None:
    record = full_config().to_record()
    record[key] = value
    with pytest.raises(error, match=match):
        RoundConfig.from_record(record)


def test_a_message_without_config_is_refused() -> None:
    with pytest.raises(PayloadError, match="no 'config' ConfigRecord"):
        RoundConfig.from_record(None)


def test_receipts_travel_in_their_own_record_and_only_strings_count() -> None:
    content = RecordDict({RECEIPT_KEY: receipts_record(["a", "b"])})
    assert read_receipts(content) == ["a", "b"]
    assert read_receipts(RecordDict({RECEIPT_KEY: ConfigRecord({"lines": "a"})})) == []
    assert read_receipts(RecordDict({})) == []
