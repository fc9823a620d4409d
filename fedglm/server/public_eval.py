"""The coordinator's own evaluation: the global model on public held-out text it names.

`federation.public_eval` names the text (fedglm/public_text.py: the held-out split of a file the
coordinator owns, or generated notes). Every round, and for the base before round 1 (round 0),
the coordinator scores the model it holds, merged and pruned as the sites hold it, and writes
`public_val_loss` and `public_val_bpb` into the round's row of `metrics.jsonl`. Nothing here
touches a site's records, so it costs no privacy: it tells the coordinator how the model does
on public text, while the sites' own losses stay private unless a site shares them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fedglm.config import PublicEvalConfig
from fedglm.data import text_bytes
from fedglm.errors import InputError
from fedglm.models.base import BaseModel
from fedglm.models.tokenizer import encode_records
from fedglm.public_text import public_text
from fedglm.training import EvalStats, held_out


@dataclass(frozen=True)
class PublicEval:
    """The tokenised held-out public records, and how they are scored."""

    records: list[list[int]]
    n_bytes: int
    seq_len: int

    @classmethod
    def open(cls, cfg: PublicEvalConfig, base: BaseModel, seq_len: int) -> PublicEval:
        """Read, split and tokenise the text with the base's tokenizer; InputError if unusable."""
        texts = public_text(cfg.text).val[: cfg.max_records]
        if not texts:
            raise InputError("federation.public_eval: its text has no held-out records; give it more records")
        return cls(encode_records(base.tokenizer(), texts), text_bytes(texts), seq_len)

    def score(self, model: nn.Module) -> EvalStats:
        """Loss and bits per byte of `model` on the records (fp32, CPU, no gradients)."""
        return held_out(model, self.records, self.seq_len, self.n_bytes)
