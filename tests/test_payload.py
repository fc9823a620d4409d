from fedglm.config import ModelConfig
from fedglm.model import build_model
from fedglm.payload import expected_shapes, state_record, wire_bytes


def test_wire_bytes_cover_the_tensors() -> None:
    model = build_model(ModelConfig().glm_args(), 0)
    record = state_record(model)
    dense = sum(p.numel() * 4 for p in model.parameters())
    assert dense < wire_bytes(record) < dense * 1.02
    assert set(expected_shapes(model)) == set(record.keys())
