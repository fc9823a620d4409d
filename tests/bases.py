"""Base model folders for tests: a tiny GLM-4 (or another tested family) with a tokenizer
trained in the test on generated public notes, random weights, saved as a Hugging Face folder."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from fedglm.corpus import generate_public_records
from fedglm.models.folder import save_folder
from fedglm.models.presets import build_glm4, glm4_config
from fedglm.models.tokenizer import train_tokenizer
from tests.models.conftest import tiny_model

VOCAB = 400


@lru_cache(maxsize=1)
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE of `VOCAB` tokens trained on 300 generated public notes (fast)."""
    return train_tokenizer(generate_public_records(300, seed=0), vocab_size=VOCAB)


def make_base(folder: Path, *, architecture: str = "Glm4ForCausalLM", seed: int = 0, **sizes: int) -> Path:
    """Write a tiny base folder (hidden 64, 2 layers, 4 heads in 2 KV groups unless `sizes`
    say otherwise) with random weights; returns `folder`."""
    tok = tokenizer()
    if architecture == "Glm4ForCausalLM":
        config = glm4_config(
            "tiny", vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **sizes
        )
        model = build_glm4(config, seed)
    else:
        model = tiny_model(architecture, seed, vocab_size=len(tok), **sizes)
    save_folder(model, tok, folder)
    return folder
