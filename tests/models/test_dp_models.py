"""Opacus' per-record gradients on each tested family equal a one-record-at-a-time loop:
LoRA (only B trains) on all four, full fine-tuning on GLM-4 (its RMSNorm via functorch)."""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus import GradSampleModule

from fedglm.models.causal import forward_logits
from fedglm.models.families import FAMILIES
from fedglm.models.lora import LoraSpec, add_adapters
from fedglm.privacy.dpsgd import per_record_loss
from tests.models.conftest import ARCHITECTURES, VOCAB, tiny_model


def _per_sample_vs_loop(model: torch.nn.Module) -> float:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, VOCAB, (3, 10), generator=generator)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    params = [p for p in model.parameters() if p.requires_grad]
    loop = []
    for row in range(len(inputs)):
        model.zero_grad()
        per_record_loss(forward_logits(model, inputs[row : row + 1]), targets[row : row + 1]).sum().backward()
        loop.append(torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None]))
        model.zero_grad()
    module = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        per_record_loss(forward_logits(module, inputs), targets).sum().backward()
    hooks = torch.cat([p.grad_sample.reshape(len(inputs), -1) for p in params], dim=1)  # type: ignore[attr-defined]
    module._close()
    return float((hooks - torch.stack(loop)).abs().max() / torch.stack(loop).abs().max())


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_lora_per_record_gradients_equal_the_loop(architecture: str) -> None:
    family = FAMILIES[architecture]
    model = add_adapters(tiny_model(architecture), LoraSpec(4, 8.0, family.projections, seed=1))
    with torch.no_grad():  # B starts at zero: give it values so A's path is exercised too
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05)
    assert _per_sample_vs_loop(model) < 1e-5


def test_full_fine_tuning_per_record_gradients_equal_the_loop() -> None:
    assert _per_sample_vs_loop(tiny_model("Glm4ForCausalLM")) < 1e-5


def test_ghost_clipping_gives_the_hooks_update_on_a_lora_model() -> None:
    """The same DP-SGD step without noise, per-record clipping in both modes: the same B."""
    from fedglm.models.lora import wire_state
    from fedglm.privacy.dpsgd import train_private

    generator = torch.Generator().manual_seed(3)
    records = [torch.randint(2, VOCAB, (20,), generator=generator).tolist() for _ in range(6)]
    spec = LoraSpec(4, 8.0, FAMILIES["Glm4ForCausalLM"].projections, seed=1)
    trained = {}
    for mode in ("hooks", "ghost"):
        model = add_adapters(tiny_model("Glm4ForCausalLM"), spec)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        train_private(
            model,
            records,
            optimizer=optimizer,
            q=1.0,
            sigma=0.0,
            clip_norm=0.01,  # small: every record is clipped, so clipping is what is compared
            steps=1,
            seq_len=16,
            precision="fp32",
            mode=mode,
            device=torch.device("cpu"),
            expected_batch_size=6.0,
            sampling=torch.Generator().manual_seed(0),
            noise=torch.Generator().manual_seed(1),
        )
        trained[mode] = {n: t for n, t in wire_state(model).items() if ".lora_B." in n}
    moved = max(float(t.abs().max()) for t in trained["hooks"].values())
    assert moved > 0
    for name, tensor in trained["hooks"].items():
        assert torch.allclose(tensor, trained["ghost"][name], atol=1e-6, rtol=1e-4), name
