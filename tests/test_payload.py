from pathlib import Path

from fedglm.models.base import BaseModel
from fedglm.models.lora import LoraSpec, is_adapter
from fedglm.payload import expected_shapes, state_record, wire_bytes


def test_wire_bytes_cover_the_tensors(tiny_base: Path) -> None:
    model = BaseModel.open(tiny_base).build(lora=None)
    record = state_record(model)
    dense = sum(p.numel() * 4 for p in model.parameters())
    assert dense < wire_bytes(record) < dense * 1.02
    assert set(expected_shapes(model)) == set(record.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in record  # transformers' own names


def test_an_adapted_model_travels_under_wire_names_not_peft_names(tiny_base: Path) -> None:
    base = BaseModel.open(tiny_base)
    model = base.build(lora=LoraSpec(rank=2, alpha=4.0, targets=("q_proj", "down_proj")))
    record = state_record(model)
    shapes = expected_shapes(model)
    assert set(shapes) == set(record.keys())
    assert not any("base_model" in name or "base_layer" in name or "default" in name for name in shapes)
    adapters = {name for name in shapes if is_adapter(name)}
    assert adapters == {
        f"model.layers.{layer}.{module}.lora_{ab}.weight"
        for layer in range(base.shape.layers)
        for module in ("self_attn.q_proj", "mlp.down_proj")
        for ab in "AB"
    }
    q = "model.layers.0.self_attn.q_proj"
    assert shapes[f"{q}.lora_A.weight"] == (2, base.shape.hidden)
    assert shapes[f"{q}.lora_B.weight"] == (base.shape.heads * base.shape.head_dim, 2)
    assert shapes[f"{q}.weight"] == (base.shape.heads * base.shape.head_dim, base.shape.hidden)
