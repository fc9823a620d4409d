import math
from pathlib import Path

import pytest
import torch

from fedglm.corpus import generate_site_records
from fedglm.data import sample_batches, text_bytes
from fedglm.models.base import BaseModel
from fedglm.models.lora import LoraSpec, is_trained_adapter, wire_state
from fedglm.models.tokenizer import encode_record, encode_records
from fedglm.training import (
    ResolvedPrecision,
    cpu_has_native_bf16,
    evaluate,
    make_optimizer,
    resolve_precision,
    steps_for,
    train_local,
)

CPU = torch.device("cpu")


def test_auto_precision_on_this_cpu() -> None:
    assert resolve_precision("auto", CPU) == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_precision("fp16", CPU) == "fp16"


@pytest.mark.parametrize(
    ("precision", "optimizer"), [("fp32", "adamw"), ("bf16", "adamw"), ("fp16", "adamw"), ("fp32", "sgd")]
)
def test_local_training_learns_in_every_precision(
    tiny_base: Path, precision: ResolvedPrecision, optimizer: str
) -> None:
    base = BaseModel.open(tiny_base)
    texts = generate_site_records(0, 20, seed=0)
    records = encode_records(base.tokenizer(), texts)
    model = base.build(lora=None)
    n_bytes = text_bytes(texts[:5])
    before = evaluate(
        model, records[:5], seq_len=64, batch_size=8, precision="fp32", device=CPU, n_bytes=n_bytes
    )
    lr = 3e-3 if optimizer == "adamw" else 0.3
    opt = make_optimizer(model, name=optimizer, lr=lr, momentum=0.9, weight_decay=0.0)
    batches = sample_batches(records, batch_size=8, seq_len=64, generator=torch.Generator().manual_seed(0))
    stats = train_local(
        model,
        batches,
        optimizer=opt,
        steps=25,
        precision=precision,
        grad_clip=1.0,
        device=CPU,
    )
    after = evaluate(
        model, records[:5], seq_len=64, batch_size=8, precision="fp32", device=CPU, n_bytes=n_bytes
    )
    assert stats.steps == 25 and stats.tokens > 0 and math.isfinite(stats.loss)
    assert after.loss < before.loss - 0.5
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_lora_training_moves_only_b_and_learns(tiny_base: Path) -> None:
    base = BaseModel.open(tiny_base)
    texts = generate_site_records(0, 20, seed=0)
    records = encode_records(base.tokenizer(), texts)
    model = base.build(lora=LoraSpec(rank=4, alpha=8.0, targets=base.family.projections, seed=1))
    before_state = {name: t.clone() for name, t in wire_state(model).items()}
    n_bytes = text_bytes(texts[:5])
    before = evaluate(
        model, records[:5], seq_len=64, batch_size=8, precision="fp32", device=CPU, n_bytes=n_bytes
    )
    opt = make_optimizer(model, name="adamw", lr=3e-2, momentum=0.9, weight_decay=0.0)
    batches = sample_batches(records, batch_size=8, seq_len=64, generator=torch.Generator().manual_seed(0))
    train_local(model, batches, optimizer=opt, steps=25, precision="fp32", grad_clip=1.0, device=CPU)
    after = evaluate(
        model, records[:5], seq_len=64, batch_size=8, precision="fp32", device=CPU, n_bytes=n_bytes
    )
    assert after.loss < before.loss - 0.1  # (adapters on a random frozen model learn slowly)
    moved = {name for name, t in wire_state(model).items() if not torch.equal(t, before_state[name])}
    assert moved and all(is_trained_adapter(name) for name in moved)  # A and the base stay frozen


def test_untrained_model_is_near_uniform_and_bpb_is_consistent(tiny_base: Path) -> None:
    base = BaseModel.open(tiny_base)
    text = "hello world"
    records = [encode_record(base.tokenizer(), text)]
    n = len(records[0])
    stats = evaluate(
        base.build(lora=None),
        records,
        seq_len=32,
        batch_size=4,
        precision="fp32",
        device=CPU,
        n_bytes=text_bytes([text]),
    )
    assert abs(stats.loss - math.log(base.config.vocab_size)) < 0.1
    assert stats.tokens == n - 1  # every token after BOS is predicted, EOS included
    assert math.isclose(stats.bits_per_byte, stats.loss * (n - 1) / math.log(2) / len(text))


def test_steps_for_epochs() -> None:
    assert steps_for(7, None, 100, 10) == 7
    assert steps_for(None, 1.5, 100, 10) == 15
