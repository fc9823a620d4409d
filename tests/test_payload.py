from fedglm.config import FederationConfig, ModelConfig, TrainConfig, validate_config
from fedglm.model import build_model
from fedglm.payload import (
    expected_shapes,
    round_config,
    split_round_config,
    state_record,
    wire_bytes,
)


def test_round_config_round_trips_including_nulls() -> None:
    fed = FederationConfig(train=TrainConfig(local_steps=None, local_epochs=0.5, grad_clip=None))
    flat = round_config(fed.model.model_dump(), fed.train.model_dump(), seed=7)
    assert all(v is not None for v in flat.values())
    model, train, seed = split_round_config(flat)
    assert seed == 7
    assert validate_config(model, ModelConfig, source="t") == fed.model
    assert validate_config(train, TrainConfig, source="t") == fed.train


def test_wire_bytes_cover_the_tensors() -> None:
    model = build_model(ModelConfig().glm_args(), 0)
    record = state_record(model)
    dense = sum(p.numel() * 4 for p in model.parameters())
    assert dense < wire_bytes(record) < dense * 1.02
    assert set(expected_shapes(model)) == set(record.keys())
