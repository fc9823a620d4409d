"""LoRA through PEFT: seeded frozen A, exact aggregation of B, stable wire names, and DP-LoRA
that learns (the guard against opacus#820's "trains normally but is unusable")."""

from __future__ import annotations

import pytest
import torch

from fedglm.data import sample_batches
from fedglm.models.causal import forward_logits
from fedglm.models.families import FAMILIES
from fedglm.models.lora import (
    LoraSpec,
    add_adapters,
    check_targets,
    is_trained_adapter,
    load_wire_state,
    merge_adapters,
    wire_state,
)
from fedglm.models.tokenizer import encode_records, train_tokenizer
from fedglm.privacy.dpsgd import train_private
from fedglm.training import evaluate, train_local
from tests.models.conftest import ARCHITECTURES, VOCAB, tiny_model

TOKENS = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def _spec(architecture: str, seed: int = 5) -> LoraSpec:
    return LoraSpec(rank=4, alpha=8.0, targets=FAMILIES[architecture].projections, seed=seed)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_adapters_start_at_the_base_and_only_b_trains(architecture: str) -> None:
    base = tiny_model(architecture).eval()
    expected = forward_logits(base, TOKENS)
    adapted = add_adapters(tiny_model(architecture), _spec(architecture)).eval()
    assert torch.equal(forward_logits(adapted, TOKENS), expected)
    trainable = [name for name, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_B." in name for name in trainable)
    per_layer = 2 * len(FAMILIES[architecture].projections)  # one B per projection, two layers
    assert len(trainable) == per_layer
    state = wire_state(adapted)
    assert {name for name in state if is_trained_adapter(name)} == {
        f"model.layers.{layer}.{part}.{proj}.lora_B.weight"
        for layer in range(2)
        for proj in FAMILIES[architecture].projections
        for part in (("self_attn",) if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else ("mlp",))
    }


def test_every_party_draws_the_same_a_from_the_seed() -> None:
    first = wire_state(add_adapters(tiny_model("Glm4ForCausalLM"), _spec("Glm4ForCausalLM")))
    second = wire_state(add_adapters(tiny_model("Glm4ForCausalLM"), _spec("Glm4ForCausalLM")))
    other = wire_state(add_adapters(tiny_model("Glm4ForCausalLM"), _spec("Glm4ForCausalLM", seed=6)))
    a_names = [name for name in first if name.endswith("lora_A.weight")]
    assert a_names and all(torch.equal(first[n], second[n]) for n in a_names)
    assert not any(torch.equal(first[n], other[n]) for n in a_names)


@pytest.mark.parametrize("architecture", ["Glm4ForCausalLM", "LlamaForCausalLM"])
def test_averaging_b_is_exactly_the_average_of_the_sites_changes(architecture: str) -> None:
    spec = _spec(architecture)
    start = wire_state(add_adapters(tiny_model(architecture), spec))
    sites = []
    for site in range(3):
        generator = torch.Generator().manual_seed(100 + site)
        state = dict(start)
        for name in state:
            if is_trained_adapter(name):  # each site drifts its own way
                state[name] = torch.randn(state[name].shape, generator=generator) * (site + 1)
        sites.append(state)
    merged_changes = [merge_adapters(state, spec.scale) for state in sites]
    averaged = dict(start)
    for name in averaged:
        if is_trained_adapter(name):
            averaged[name] = torch.stack([state[name] for state in sites]).mean(0)
    merged = merge_adapters(averaged, spec.scale)
    for name, weight in merged.items():
        exact = torch.stack([changed[name] for changed in merged_changes]).mean(0)
        assert torch.allclose(weight, exact, atol=1e-5, rtol=1e-5), name


def test_wire_state_round_trips_into_a_fresh_model() -> None:
    spec = _spec("Qwen2ForCausalLM")
    trained = add_adapters(tiny_model("Qwen2ForCausalLM"), spec)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.1)
    fresh = add_adapters(tiny_model("Qwen2ForCausalLM", seed=9), spec)
    load_wire_state(fresh, wire_state(trained))
    assert torch.equal(forward_logits(fresh.eval(), TOKENS), forward_logits(trained.eval(), TOKENS))
    plain = tiny_model("Qwen2ForCausalLM", seed=9)
    load_wire_state(plain, merge_adapters(wire_state(trained), spec.scale))
    assert torch.allclose(forward_logits(plain.eval(), TOKENS), forward_logits(trained, TOKENS), atol=1e-5)
    with pytest.raises(ValueError, match="does not fit the model"):
        load_wire_state(plain, wire_state(trained))


def test_a_target_the_family_lacks_is_named() -> None:
    with pytest.raises(ValueError, match="'gate_proj' is not a projection of Glm4ForCausalLM"):
        check_targets(("q_proj", "gate_proj"), FAMILIES["Glm4ForCausalLM"])
    check_targets(("gate_proj", "up_proj"), FAMILIES["LlamaForCausalLM"])


def test_dp_lora_with_clipping_and_no_noise_learns_like_plain_lora() -> None:
    text = [
        f"Patient {i} reports {w} pain, treated with {d}."
        for i in range(60)
        for w, d in [("chest", "aspirin")]
    ]
    tokenizer = train_tokenizer(text, vocab_size=VOCAB)
    records = encode_records(tokenizer, text)
    spec = LoraSpec(rank=8, alpha=16.0, targets=FAMILIES["Glm4ForCausalLM"].projections, seed=1)
    device = torch.device("cpu")

    def fresh() -> torch.nn.Module:
        return add_adapters(tiny_model("Glm4ForCausalLM"), spec)

    def loss(model: torch.nn.Module) -> float:
        stats = evaluate(
            model, records[:20], seq_len=32, batch_size=20, precision="fp32", device=device, n_bytes=1
        )
        return stats.loss

    before = loss(fresh())
    plain = fresh()
    optimizer = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-2)
    batches = sample_batches(records, batch_size=8, seq_len=32, generator=torch.Generator().manual_seed(0))
    train_local(
        plain, batches, optimizer=optimizer, steps=30, precision="fp32", grad_clip=None, device=device
    )
    private = fresh()
    optimizer = torch.optim.AdamW([p for p in private.parameters() if p.requires_grad], lr=1e-2)
    train_private(
        private,
        records,
        optimizer=optimizer,
        q=8 / len(records),
        sigma=0.0,
        clip_norm=10.0,
        steps=30,
        seq_len=32,
        precision="fp32",
        mode="hooks",
        device=device,
        expected_batch_size=8.0,
        sampling=torch.Generator().manual_seed(0),
        noise=torch.Generator().manual_seed(1),
    )
    plain_gain, private_gain = before - loss(plain), before - loss(private)
    assert plain_gain > 0.5, plain_gain
    assert private_gain > 0.7 * plain_gain, (private_gain, plain_gain)
