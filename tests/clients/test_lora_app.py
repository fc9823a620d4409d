"""A site that trains LoRA adapters with DP: the real ClientApp handler, one round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Message

from fedglm.clients.app import train
from fedglm.compression import Kind, decode, model_hash
from fedglm.config import ModelConfig, PrivacyConfig, TrainConfig
from fedglm.errors import InputError
from fedglm.lora import add_adapters, is_adapter
from fedglm.model import build_model
from fedglm.payload import LEDGER_KEY, read_payload
from fedglm.protocol import BASE_HASH_KEY
from fedglm.server.broadcast import Broadcast
from tests.clients.handler import site_context, train_message

MODEL = ModelConfig(d_model=32, n_layers=1, n_heads=2, d_ff=48, max_seq_len=64)
TRAIN = TrainConfig(
    adapters="lora", lora_rank=2, lora_targets=["q_proj", "v_proj"], local_steps=2, seq_len=32
)


NOTES = [f"note {i}: stable, follow up. " * 2 for i in range(40)]
PRIVACY = PrivacyConfig(sample_rate=0.1, noise_multiplier=1.0, rounds=1)


def first_message(base_hash: str) -> tuple[Message, Broadcast]:
    model = add_adapters(build_model(MODEL.glm_args(), 7), TRAIN.lora_spec(MODEL.init_seed))  # type: ignore[arg-type]
    adapters = [name for name in model.state_dict() if is_adapter(name)]
    return train_message(
        model.state_dict(), MODEL, TRAIN, trainable=adapters, extra={BASE_HASH_KEY: base_hash}
    )


def base_hash() -> str:
    return model_hash(build_model(MODEL.glm_args(), 7).state_dict()).hex()


def test_with_lora_only_adapter_tensors_leave_the_site(tmp_path: Path) -> None:
    message, broadcast = first_message(base_hash())
    reply = train(message, site_context(tmp_path, NOTES, PRIVACY, base_hash=base_hash()))
    blob = read_payload(reply.content)
    assert blob is not None and LEDGER_KEY in reply.content.config_records
    header, tensors = decode(blob, broadcast.update_shapes)  # the server's check: adapters only
    assert header.kind == Kind.UPDATE and tensors
    assert all(
        name.endswith(
            ("q_proj.lora_a.weight", "q_proj.lora_b.weight", "v_proj.lora_a.weight", "v_proj.lora_b.weight")
        )
        for name in tensors
    )
    ledger = json.loads(reply.content.config_records[LEDGER_KEY]["line"])
    assert ledger["entry"]["steps"] >= 1


def test_a_site_pinned_to_another_base_refuses_the_round(tmp_path: Path) -> None:
    message, _ = first_message(base_hash())
    with pytest.raises(InputError, match="accepts only base"):
        train(message, site_context(tmp_path, NOTES, PRIVACY, base_hash="0" * 64))
    assert not (tmp_path / "state" / "global-model.pt").exists()
