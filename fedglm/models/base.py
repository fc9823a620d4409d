"""The base model of a run: a checked local folder, and the model each round builds from it.

Both sides hold the base as a folder: the coordinator names it in `federation.base`, a hospital
in its own config (`base`). The coordinator announces the folder's hash (`folder_hash`) in
every round; a site whose folder hashes otherwise refuses the run before training, so the
coordinator cannot swap the model a site fine-tunes, and the base never crosses the network
(a 9 B checkpoint is 18 GB). The tokenizer comes from the same folder.

`BaseModel.build(lora, mask)` is the round's starting model on both sides, bit for bit: the
folder's weights, LoRA adapters from the run's seed (A drawn at the unpruned shape), then sliced
to the pruning mask; its `wire_state` is what the coordinator's round 1 (an INIT payload: build it
yourself) names by hash.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from fedglm.errors import InputError
from fedglm.models.families import Family, Shape, shape_of
from fedglm.models.folder import check_folder, check_weight_headers, folder_hash, load_model, load_tokenizer
from fedglm.models.lora import (
    LoraSpec,
    add_adapters,
    check_targets,
    load_wire_state,
    merge_adapters,
    wire_state,
)
from fedglm.models.pruning import Mask, pruned_config, slice_state

if TYPE_CHECKING:
    from fedglm.config import FederationConfig


def meta_model(config: Any) -> nn.Module:
    """A model of `config` without weights (shapes only: counting, describing)."""
    with torch.device("meta"):
        model: nn.Module = AutoModelForCausalLM.from_config(config)
    return model


@dataclass(frozen=True)
class BaseModel:
    """A model folder that passed `check_folder`, with its config, shape and hash."""

    folder: Path
    family: Family
    config: Any  # the transformers config of the unpruned model
    hash: str

    @classmethod
    def open(cls, folder: Path) -> BaseModel:
        family = check_folder(folder)
        check_weight_headers(folder)
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(
                f"{folder}: unreadable config.json ({type(exc).__name__}: {str(exc)[:100]})"
            ) from None
        return cls(folder, family, config, folder_hash(folder))

    @property
    def shape(self) -> Shape:
        return shape_of(self.config)

    @property
    def max_positions(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 0) or 0)

    @cached_property
    def parameters(self) -> int:
        """Parameters of the unpruned model, counted without allocating its weights."""
        return sum(p.numel() for p in meta_model(self.config).parameters())

    def trained(self, lora: LoraSpec | None) -> int:
        """Parameters a round trains: all of them, or LoRA's B matrices (A is frozen)."""
        if lora is None:
            return self.parameters
        model = meta_model(self.config)
        return sum(
            module.out_features * lora.rank
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
            and ".layers." in name
            and name.rsplit(".", 1)[-1] in lora.targets
        )

    def tokenizer(self) -> PreTrainedTokenizerFast:
        tokenizer = load_tokenizer(self.folder)
        if tokenizer.eos_token_id is None:
            raise InputError(f"{self.folder}: its tokenizer has no EOS token, which ends every record")
        return tokenizer

    def check_lora(self, lora: LoraSpec | None) -> None:
        if lora is not None:
            try:
                check_targets(lora.targets, self.family)
            except ValueError as exc:
                raise InputError(f"train.lora_targets: {exc}") from None

    def build(self, *, lora: LoraSpec | None, mask: Mask | None = None) -> nn.Module:
        """The folder's model with `lora` adapters (None: full fine-tuning), sliced to `mask`."""
        self.check_lora(lora)
        model: nn.Module = load_model(self.folder)
        if lora is not None:
            model = add_adapters(model, lora)
        if mask is None or mask == Mask.full(self.shape):
            return model
        state = slice_state(wire_state(model), self.shape, self.family, Mask.full(self.shape), mask)
        return self.empty(lora=lora, mask=mask, state=state)

    def merged(
        self, state: dict[str, torch.Tensor], *, mask: Mask | None, lora_scale: float | None
    ) -> nn.Module:
        """The model of a wire `state` at the `mask`'s shape, LoRA adapters (when `lora_scale`
        is set) merged into the weights, in eval mode: what the release and the coordinator's
        own scoring use."""
        if lora_scale is not None:
            state = merge_adapters(state, lora_scale)
        return self.empty(lora=None, mask=mask, state=state).eval()

    def empty(
        self, *, lora: LoraSpec | None, mask: Mask | None = None, state: dict[str, torch.Tensor] | None = None
    ) -> nn.Module:
        """A model of the (pruned) shape with `state` loaded, without reading the folder's weights."""
        config = self.config if mask is None else pruned_config(self.config, mask)
        with torch.random.fork_rng(devices=[]):  # its random initial values are overwritten
            model: nn.Module = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if lora is not None:
            model = add_adapters(model, lora)
        if state is not None:
            load_wire_state(model, state)
        return model.train()


def open_run_base(folder: Path | None, seq_len: int) -> BaseModel:
    """The run's base folder, checked; an `InputError` line if it is missing or unfit."""
    if folder is None:
        raise InputError(
            "federation.base is not set: name a base model folder (made by `fedglm pretrain`, or a "
            "Hugging Face GLM-4, GLM, Llama or Qwen2 checkpoint)"
        )
    base = BaseModel.open(folder)
    if seq_len > base.max_positions:
        raise InputError(
            f"train.seq_len ({seq_len}) exceeds the {base.max_positions} positions of the base model {folder}"
        )
    return base


def open_federation_base(fed: FederationConfig) -> tuple[BaseModel, LoraSpec | None]:
    """The federation's base and the adapters every party builds on it, both checked: what the
    coordinator refuses before its SuperLink starts, not in round 1."""
    base = open_run_base(fed.base, fed.train.seq_len)
    lora = fed.train.lora_spec(fed.model.init_seed, base.family)
    base.check_lora(lora)
    return base, lora
