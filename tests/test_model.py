import pytest
import torch
from opacus import GradSampleModule

from fedglm.config import ModelConfig
from fedglm.model import EOS_ID, GLM, VOCAB_SIZE, GLMArgs, apply_rotary, build_model, rotary_tables
from fedglm.training import lm_loss

ARGS = GLMArgs(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16)


def test_same_seed_same_weights_other_seed_differs() -> None:
    a, b, c = build_model(ARGS, 1), build_model(ARGS, 1), build_model(ARGS, 2)
    for (name, pa), pb, pc in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc), name


def test_init_ignores_global_rng() -> None:
    torch.manual_seed(0)
    a = build_model(ARGS, 3)
    torch.manual_seed(99)
    b = build_model(ARGS, 3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_forward_shape_and_causality() -> None:
    model = build_model(ARGS, 0).eval()
    tokens = torch.randint(0, 256, (2, 12))
    logits = model(tokens)
    assert logits.shape == (2, 12, VOCAB_SIZE)
    changed = tokens.clone()
    changed[:, 8:] = EOS_ID
    # Positions before the change cannot see it.
    assert torch.allclose(model(changed)[:, :8], logits[:, :8], atol=1e-6)


def test_rotary_preserves_norm_and_is_relative() -> None:
    cos, sin = rotary_tables(10, 8, 10000.0, torch.device("cpu"))
    q = torch.randn(1, 1, 10, 8)
    rotated = apply_rotary(q, cos, sin)
    assert torch.allclose(rotated.norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    # <R_m q, R_n k> depends only on m - n.
    k = torch.randn(1, 1, 1, 8).expand(1, 1, 10, 8)
    qq = q[:, :, :1].expand(1, 1, 10, 8)
    dots = (apply_rotary(qq, cos, sin)[..., 1:, :] * apply_rotary(k, cos, sin)[..., :-1, :]).sum(-1)
    dots2 = (apply_rotary(qq, cos, sin)[..., 2:, :] * apply_rotary(k, cos, sin)[..., 1:-1, :]).sum(-1)
    assert torch.allclose(dots[..., :-1], dots2, atol=1e-5)


def test_too_long_sequence_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        build_model(ARGS, 0)(torch.zeros(1, 17, dtype=torch.long))


def test_model_has_no_buffers_and_untied_head() -> None:
    model = build_model(ARGS, 0)
    assert list(model.buffers()) == []
    assert model.lm_head.weight.data_ptr() != model.embed.weight.data_ptr()


def test_opacus_per_sample_gradients_match_one_sample_loop() -> None:
    """Opacus must compute exact per-sample gradients for this model (DP-SGD readiness)."""
    torch.manual_seed(0)
    model = build_model(ARGS, 0)
    inputs = torch.randint(0, 256, (3, 10))
    targets = torch.randint(0, 256, (3, 10))
    gsm = GradSampleModule(build_model(ARGS, 0), loss_reduction="sum")
    lm_loss(gsm(inputs), targets, reduction="sum").backward()
    for i in range(3):
        model.zero_grad()
        lm_loss(model(inputs[i : i + 1]), targets[i : i + 1], reduction="sum").backward()
        for (name, p), gp in zip(model.named_parameters(), gsm._module.parameters(), strict=True):
            assert p.grad is not None
            torch.testing.assert_close(gp.grad_sample[i], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_presets_build() -> None:
    for preset in ("tiny", "small"):
        cfg = ModelConfig(preset=preset)
        assert isinstance(GLM(cfg.glm_args()), GLM)
