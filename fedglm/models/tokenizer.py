"""The tokenizer `fedglm pretrain` trains on public text: a byte-level BPE (`tokenizers`).

Byte level means every UTF-8 string round-trips exactly (no unknown token), whatever its
script. Special tokens: `<|bos|>` opens a record, `<|eos|>` closes it and also pads. It is
wrapped as `PreTrainedTokenizerFast`, so `save_pretrained` writes a folder that transformers 4
and 5 both load. A record is encoded as `[bos] + tokens + [eos]` (a checkpoint's tokenizer
without BOS, as Qwen2's and GLM-4's: `tokens + [eos]`). A record's text is never read as
special tokens: "<|eos|>" written in a note is plain characters (`split_special_tokens`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS = "<|bos|>"
EOS = "<|eos|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE of `vocab_size` tokens (special tokens included) trained on `texts`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=EOS)


def _frame(tokenizer: PreTrainedTokenizerFast) -> tuple[list[int], list[int]]:
    """What opens and closes a record: BOS if the tokenizer has one (Qwen2 and GLM-4 have none),
    and EOS, which every causal LM tokenizer has."""
    bos = [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]
    return bos, [int(tokenizer.eos_token_id)]


def encode_record(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """One record's token ids, framed by BOS (if any) and EOS."""
    bos, eos = _frame(tokenizer)
    ids: list[int] = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    return [*bos, *ids, *eos]


def encode_records(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> list[list[int]]:
    """Every record framed by BOS (if any) and EOS (the fast tokenizer encodes them at once)."""
    bos, eos = _frame(tokenizer)
    batch = tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [[*bos, *ids, *eos] for ids in batch]
