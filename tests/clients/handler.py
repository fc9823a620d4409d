"""A site's real ClientApp handler, driven as Flower drives it: a site spec on disk naming its
base model folder, a node context naming the spec, and a TRAIN message built by the
coordinator's own `Broadcast` from the coordinator's copy of the base."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.common import MessageType

from fedglm.clients.site import SITE_KEY
from fedglm.config import (
    DataConfig,
    LinkConfig,
    ModelConfig,
    PrivacyConfig,
    ShareConfig,
    SiteSpec,
    TrainConfig,
)
from fedglm.models.base import BaseModel
from fedglm.models.lora import is_trained_adapter, wire_state
from fedglm.payload import ARRAYS_KEY, CONFIG_KEY, payload_record
from fedglm.privacy.keys import make_keys
from fedglm.protocol import RoundConfig
from fedglm.server.broadcast import Broadcast


def site_context(
    tmp_path: Path,
    notes: list[str],
    privacy: PrivacyConfig,
    *,
    base: Path,
    share: ShareConfig | None = None,
) -> Context:
    """A site holding `notes` (one record each) and its copy of the base folder `base`, with its
    keys and state under `tmp_path`."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "notes.jsonl"
    data.write_text("".join(json.dumps({"text": note}) + "\n" for note in notes))
    state = tmp_path / "state"
    if not (state / "ledger.key").exists():
        make_keys(state, "ledger")
    site = SiteSpec(
        name="h1",
        data=DataConfig(path=data, field="text"),
        share=share or ShareConfig(),
        privacy=privacy,
        state_dir=state,
        base=base,
    )
    spec = tmp_path / "site-spec.json"
    spec.write_text(site.model_dump_json())
    return Context(run_id=1, node_id=1, node_config={SITE_KEY: str(spec)}, state=RecordDict(), run_config={})


def coordinator_state(
    base: Path, train: TrainConfig, model: ModelConfig | None = None
) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """The round's starting model as the coordinator builds it from its copy of the base
    (`server.app.start_or_resume`), and the tensors sites train and send (None: all of them)."""
    opened = BaseModel.open(base)
    lora = train.lora_spec((model or ModelConfig()).init_seed, opened.family)
    state = dict(wire_state(opened.build(lora=lora)))
    trainable = [name for name in state if is_trained_adapter(name)] if lora is not None else None
    return state, trainable


def train_message(
    base: Path,
    train: TrainConfig,
    *,
    model: ModelConfig | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
    server_round: int = 1,
    extra: Mapping[str, Any] | None = None,
    uplink: tuple[str, float] = ("topk", 0.5),
    message_type: str = MessageType.TRAIN,
) -> tuple[Message, Broadcast]:
    """The coordinator's TRAIN message of a run from the base folder `base` (its hash announced).

    Without `state`, the coordinator's own starting model, sent as a real first round sends it
    (INIT: each site builds it from its own folder); with `state`, that model in full (FULL), as
    a coordinator sends a site it believes holds nothing. `extra` overrides config keys."""
    model = model or ModelConfig()
    built, trainable = coordinator_state(base, train, model)
    if state is None:
        broadcast = Broadcast(built, initial=True, trainable=trainable)
    else:
        broadcast = Broadcast(dict(state), trainable=trainable)
    settings = RoundConfig(
        model=model,
        train=train,
        seed=0,
        server_round=server_round,
        rounds=1,
        run_key="run",
        uplink=LinkConfig(codec=uplink[0], density=uplink[1], selection="global"),
        base_hash=BaseModel.open(base).hash,
    )
    config = ConfigRecord({**settings.to_record(), **(extra or {})})
    content = RecordDict(
        {ARRAYS_KEY: payload_record(broadcast.payload_for(1, server_round)), CONFIG_KEY: config}
    )
    metadata = Metadata(
        run_id=1,
        message_id=f"m{server_round}",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=600.0,
        message_type=message_type,
    )
    return Message(content=content, metadata=metadata), broadcast
