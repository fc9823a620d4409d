import math

import pytest
import torch

from fedglm.config import ModelConfig
from fedglm.corpus import generate_site_records
from fedglm.data import encode, sample_batches
from fedglm.model import build_model
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
def test_local_training_learns_in_every_precision(precision: ResolvedPrecision, optimizer: str) -> None:
    records = [encode(t) for t in generate_site_records(0, 20, seed=0)]
    model = build_model(ModelConfig().glm_args(), 0)
    before = evaluate(model, records[:5], seq_len=64, batch_size=8, precision="fp32", device=CPU)
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
    after = evaluate(model, records[:5], seq_len=64, batch_size=8, precision="fp32", device=CPU)
    assert stats.steps == 25 and stats.tokens > 0 and math.isfinite(stats.loss)
    assert after.loss < before.loss - 0.5
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_untrained_model_is_near_uniform_and_bpb_is_consistent() -> None:
    records = [encode("hello world")]
    stats = evaluate(
        build_model(ModelConfig().glm_args(), 0),
        records,
        seq_len=32,
        batch_size=4,
        precision="fp32",
        device=CPU,
    )
    assert abs(stats.loss - math.log(258)) < 0.1
    assert stats.tokens == 12
    assert math.isclose(stats.bits_per_byte, stats.loss * 12 / math.log(2) / 11)


def test_steps_for_epochs() -> None:
    assert steps_for(7, None, 100, 10) == 7
    assert steps_for(None, 1.5, 100, 10) == 15
