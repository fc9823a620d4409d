"""A site that trains LoRA adapters with DP: the real ClientApp handler, one round."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.common import MessageType

from fedglm.clients.app import SITE_KEY, train
from fedglm.compression import Kind, decode, model_hash
from fedglm.config import DataConfig, ModelConfig, PrivacyConfig, SiteSpec, TrainConfig
from fedglm.errors import InputError
from fedglm.lora import add_adapters, is_adapter
from fedglm.model import build_model
from fedglm.payload import (
    ARRAYS_KEY,
    BASE_HASH_KEY,
    CONFIG_KEY,
    LEDGER_KEY,
    payload_record,
    read_payload,
    round_config,
)
from fedglm.privacy.keys import make_keys
from fedglm.server.broadcast import Broadcast

MODEL = ModelConfig(d_model=32, n_layers=1, n_heads=2, d_ff=48, max_seq_len=64)
TRAIN = TrainConfig(
    adapters="lora", lora_rank=2, lora_targets=["q_proj", "v_proj"], local_steps=2, seq_len=32
)


def site_context(tmp_path: Path, base_hash: str | None = None) -> Context:
    notes = tmp_path / "notes.jsonl"
    notes.write_text(
        "".join(json.dumps({"text": f"note {i}: stable, follow up. " * 2}) + "\n" for i in range(40))
    )
    state = tmp_path / "state"
    make_keys(state, "ledger")
    site = SiteSpec(
        name="h1",
        data=DataConfig(path=notes, field="text"),
        privacy=PrivacyConfig(sample_rate=0.1, noise_multiplier=1.0, rounds=1),
        state_dir=state,
        base_hash=base_hash,
    )
    spec = tmp_path / "site-spec.json"
    spec.write_text(site.model_dump_json())
    return Context(run_id=1, node_id=1, node_config={SITE_KEY: str(spec)}, state=RecordDict(), run_config={})


def first_message(base_hash: str) -> tuple[Message, Broadcast]:
    model = add_adapters(build_model(MODEL.glm_args(), 7), TRAIN.lora_spec(MODEL.init_seed))  # type: ignore[arg-type]
    adapters = [name for name in model.state_dict() if is_adapter(name)]
    broadcast = Broadcast(dict(model.state_dict()), trainable=adapters)
    config = ConfigRecord(
        {
            **round_config(MODEL.model_dump(), TRAIN.model_dump(), 0),
            BASE_HASH_KEY: base_hash,
            "server-round": 1,
            "run-key": "run",
            "rounds": 1,
            "uplink.codec": "topk",
            "uplink.density": 0.5,
            "uplink.selection": "global",
        }
    )
    content = RecordDict({ARRAYS_KEY: payload_record(broadcast.payload_for(1, 1)), CONFIG_KEY: config})
    metadata = Metadata(
        run_id=1,
        message_id="m1",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=600.0,
        message_type=MessageType.TRAIN,
    )
    return Message(content=content, metadata=metadata), broadcast


def base_hash() -> str:
    return model_hash(build_model(MODEL.glm_args(), 7).state_dict()).hex()


def test_with_lora_only_adapter_tensors_leave_the_site(tmp_path: Path) -> None:
    message, broadcast = first_message(base_hash())
    reply = train(message, site_context(tmp_path, base_hash=base_hash()))
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
        train(message, site_context(tmp_path, base_hash="0" * 64))
    assert not (tmp_path / "state" / "global-model.pt").exists()
