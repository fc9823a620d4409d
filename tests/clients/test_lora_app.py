"""A site that trains LoRA adapters with DP: the real ClientApp handler, one round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Message

from fedglm.clients.app import train
from fedglm.clients.state import MODEL_FILE
from fedglm.compression import Kind, decode
from fedglm.config import PrivacyConfig, TrainConfig
from fedglm.errors import InputError
from fedglm.models.base import BaseModel
from fedglm.payload import LEDGER_KEY, read_payload
from fedglm.server.broadcast import Broadcast
from tests.bases import make_base
from tests.clients.handler import site_context, train_message

TRAIN = TrainConfig(
    adapters="lora", lora_rank=2, lora_targets=["q_proj", "v_proj"], local_steps=2, seq_len=32
)


NOTES = [f"note {i}: stable, follow up. " * 2 for i in range(40)]
PRIVACY = PrivacyConfig(sample_rate=0.1, noise_multiplier=1.0, rounds=1)


def first_message(base: Path) -> tuple[Message, Broadcast]:
    return train_message(base, TRAIN)


def test_with_lora_only_adapter_tensors_leave_the_site(tmp_path: Path, tiny_base: Path) -> None:
    message, broadcast = first_message(tiny_base)
    reply = train(message, site_context(tmp_path, NOTES, PRIVACY, base=tiny_base))
    blob = read_payload(reply.content)
    assert blob is not None and LEDGER_KEY in reply.content.config_records
    header, tensors = decode(blob, broadcast.update_shapes)  # the server's check: trained adapters only
    assert header.kind == Kind.UPDATE and tensors
    # only B of the targeted projections: A is frozen (drawn from the seed), the base never leaves
    layers = BaseModel.open(tiny_base).shape.layers
    assert set(broadcast.update_shapes) == {
        f"model.layers.{layer}.self_attn.{proj}.lora_B.weight"
        for layer in range(layers)
        for proj in ("q_proj", "v_proj")
    }
    assert set(tensors) <= set(broadcast.update_shapes)
    ledger = json.loads(reply.content.config_records[LEDGER_KEY]["line"])
    assert ledger["entry"]["steps"] >= 1


def test_a_site_whose_base_is_another_refuses_the_round(tmp_path: Path, tiny_base: Path) -> None:
    """The coordinator announces its base's hash; a site holding another folder (same
    architecture and shapes, other weights) refuses before building anything."""
    own = make_base(tmp_path / "own-base", seed=1)
    message, _ = first_message(tiny_base)
    with pytest.raises(InputError, match=r"but this site's base folder .*own-base hashes to"):
        train(message, site_context(tmp_path / "site", NOTES, PRIVACY, base=own))
    assert not (tmp_path / "site" / "state" / MODEL_FILE).exists()
