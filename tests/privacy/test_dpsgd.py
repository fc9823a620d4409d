"""DP-SGD at a site: exact per-record gradients, clipping that holds under bf16, refused modes."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from fedglm.data import IGNORE_INDEX, PAD_INPUT
from fedglm.models.causal import forward_logits
from fedglm.models.presets import build_glm4, glm4_config
from fedglm.models.tokenizer import encode_record
from fedglm.privacy.dpsgd import check_precision, dp_precision, per_record_loss, train_private
from fedglm.training import ResolvedPrecision, TrainStats, cpu_has_native_bf16
from tests.bases import tokenizer

CPU = torch.device("cpu")
SEQ_LEN = 32


def build_model(seed: int) -> nn.Module:
    """The `tiny` GLM-4 preset with one layer over the test tokenizer, every weight trained.

    The preset's pad id is EOS, never an input: the embedding row of `padding_idx` gets no
    gradient from autograd, but Opacus' per-sample embedding gradient ignores `padding_idx`, so
    a model whose pad id is an input token (BOS) would differ from the reference on that row."""
    tok = tokenizer()
    config = glm4_config(
        "tiny",
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        num_hidden_layers=1,
    )
    return build_glm4(config, seed)


def records(n: int) -> list[list[int]]:
    # shorter than the window: every record's window is the whole record, deterministic
    data = [encode_record(tokenizer(), f"note {i}: " + "abc " * (i % 4 + 1)) for i in range(n)]
    assert all(len(tokens) <= SEQ_LEN for tokens in data)
    return data


def dp_steps(model: nn.Module, data: list[list[int]], **settings: Any) -> TrainStats:
    """`train_private` with SGD and these tests' defaults, overridden by `settings`."""
    lr = settings.pop("lr", 1.0)
    kwargs: dict[str, Any] = {
        "q": 1.0,
        "sigma": 1.0,
        "clip_norm": 1.0,
        "steps": 1,
        "seq_len": SEQ_LEN,
        "precision": "fp32",
        "mode": "hooks",
        "device": CPU,
    }
    kwargs.update(settings)
    kwargs.setdefault("expected_batch_size", max(1.0, kwargs["q"] * len(data)))
    return train_private(model, data, optimizer=torch.optim.SGD(model.parameters(), lr=lr), **kwargs)


def flat_change(model: nn.Module, before: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(p.detach() - before[n]).reshape(-1) for n, p in model.named_parameters()])


def one_step(
    model: nn.Module,
    data: list[list[int]],
    *,
    clip: float,
    precision: ResolvedPrecision = "fp32",
    mode: str = "hooks",
) -> torch.Tensor:
    """The parameter change of one noise-free SGD step (lr 1) in which every record is drawn."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dp_steps(model, data, sigma=0.0, clip_norm=clip, precision=precision, mode=mode)
    return flat_change(model, before)


def reference_gradient(model: nn.Module, data: list[list[int]]) -> torch.Tensor:
    """The mean over records of each record's own gradient, one record at a time, no Opacus."""
    total = None
    for tokens in data:
        model.zero_grad()
        pad = SEQ_LEN - len(tokens) + 1
        x = torch.tensor([tokens[:-1] + [PAD_INPUT] * pad])
        y = torch.tensor([tokens[1:] + [IGNORE_INDEX] * pad])
        per_record_loss(forward_logits(model, x), y).sum().backward()
        grads = []
        for p in model.parameters():
            assert p.grad is not None, "every parameter gets a gradient"
            grads.append(p.grad.reshape(-1))
        grad = torch.cat(grads)
        total = grad if total is None else total + grad
    assert total is not None
    return total / len(data)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_unclipped_noise_free_step_is_the_mean_of_per_record_gradients(mode: str) -> None:
    data = records(6)
    model = build_model(0)
    expected = -reference_gradient(build_model(0), data)
    change = one_step(model, data, clip=1e6, mode=mode)
    torch.testing.assert_close(change, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_clipped_record_never_exceeds_the_clipping_norm(precision: ResolvedPrecision) -> None:
    if precision == "bf16" and not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16")
    clip = 0.01  # far below the gradient norm: clipping is active
    for seed in range(5):
        change = one_step(build_model(seed), records(1), clip=clip, precision=precision)
        norm = float(change.norm())
        assert norm <= clip * (1 + 1e-5), norm  # bf16 per-sample norms alone reach 1.0023 C
        assert norm >= clip * (1 - 1e-4)  # and clipping is exact: bf16 norms miss by 0.1%


def test_a_step_that_draws_no_record_releases_noise_only() -> None:
    model = build_model(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = dp_steps(model, records(4), q=1e-12, steps=2)
    change = flat_change(model, before)
    assert stats.tokens == 0
    # two steps of N(0, (sigma C)^2) per coordinate, averaged over an expected batch of 1
    assert 0.5 < float(change.std()) / 2**0.5 < 1.5


def test_fp16_with_a_gradient_scaler_is_refused_and_ghost_runs_in_fp32() -> None:
    assert "fp16" in (check_precision("hooks", "fp16") or "")
    assert "fp32 only" in (check_precision("ghost", "bf16") or "")
    assert check_precision("hooks", "bf16") is None
    assert dp_precision("auto", "fp16", "hooks") == "fp32"
    assert dp_precision("auto", "bf16", "ghost") == "fp32"
    assert dp_precision("auto", "bf16", "hooks") == "bf16"
    with pytest.raises(ValueError, match="refused"):
        dp_steps(build_model(0), records(2), q=0.5, precision="fp16")


def test_sampling_and_noise_are_not_replayable() -> None:
    """Two runs from the same model and data differ: the generators are seeded secretly."""
    changes = []
    for _ in range(2):
        model = build_model(0)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        dp_steps(model, records(8), q=0.5, lr=0.1)
        changes.append(flat_change(model, before))
    assert not torch.equal(changes[0], changes[1])


def test_the_model_is_left_without_opacus_hooks() -> None:
    model = build_model(0)
    one_step(model, records(2), clip=1.0)
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(not hasattr(p, "grad_sample") or p.grad_sample is None for p in model.parameters())


def test_dp_randomness_is_seeded_only_in_a_test_that_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedglm.privacy.dpsgd import TEST_SEED_ENV, secret_generator

    monkeypatch.delenv(TEST_SEED_ENV, raising=False)
    assert secret_generator().initial_seed() != secret_generator().initial_seed()
    monkeypatch.setenv(TEST_SEED_ENV, "5")
    with pytest.warns(UserWarning, match="not private"):
        first, again, noise = secret_generator(), secret_generator(), secret_generator(stream=1)
    assert first.initial_seed() == again.initial_seed() != noise.initial_seed()
    monkeypatch.delenv("PYTEST_CURRENT_TEST")  # outside a test run the variable does nothing
    assert secret_generator().initial_seed() != secret_generator().initial_seed()
