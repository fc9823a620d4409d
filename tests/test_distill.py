import torch

from fedglm.corpus import generate_public_records
from fedglm.data import encode
from fedglm.distill import distill, distillation_loss, make_student, student_layers
from fedglm.model import GLM, Block, GLMArgs, build_model
from fedglm.training import lm_loss

ARGS = GLMArgs(d_model=32, n_layers=4, n_heads=4, d_ff=64, max_seq_len=32, layer_heads=(4, 3, 4, 2))


def block(model: GLM, index: int) -> Block:
    layer = model.blocks[index]
    assert isinstance(layer, Block)
    return layer


def test_student_layers_are_evenly_spaced_keeping_first_and_last() -> None:
    assert student_layers(4, 2) == [0, 3]
    assert student_layers(8, 3) == [0, 4, 7]
    assert student_layers(4, 1) == [0]
    assert student_layers(4, 4) == [0, 1, 2, 3]


def test_the_student_starts_from_the_teachers_weights() -> None:
    teacher = build_model(ARGS, 0)
    student = make_student(teacher, layers=2, heads=0.5, channels=0.25)
    assert student.args.n_layers == 2
    assert student.args.layer_heads == (2, 1) and student.args.layer_ff == (48, 48)
    assert torch.equal(student.embed.weight, teacher.embed.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert torch.equal(block(student, 1).attn_norm.weight, block(teacher, 3).attn_norm.weight)
    rows = block(student, 1).attn.v_proj.weight
    assert any(torch.equal(rows, block(teacher, 3).attn.v_proj.weight[h * 8 : h * 8 + 8]) for h in range(2))


def test_the_loss_mixes_kl_and_next_token_loss() -> None:
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 5, 258, generator=generator)
    student = torch.randn(2, 5, 258, generator=generator)
    targets = torch.randint(0, 258, (2, 5), generator=generator)
    ce = lm_loss(student, targets)
    assert torch.isclose(distillation_loss(student, teacher, targets, temperature=2.0, alpha=0.0), ce)
    same = distillation_loss(teacher, teacher, targets, temperature=2.0, alpha=1.0)
    assert abs(float(same)) < 1e-5
    assert float(distillation_loss(student, teacher, targets, temperature=2.0, alpha=1.0)) > 0.1


def test_distillation_brings_the_student_towards_the_teacher() -> None:
    teacher = build_model(GLMArgs(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32), 0)
    records = [encode(t) for t in generate_public_records(40, seed=1)]
    student = make_student(teacher, layers=1, heads=0.0, channels=0.0)
    tokens = torch.tensor([records[0][:32]])

    def gap() -> float:
        with torch.no_grad():
            return float(
                distillation_loss(student(tokens), teacher(tokens), tokens, temperature=1.0, alpha=1.0)
            )

    before = gap()
    distill(
        teacher,
        student,
        records,
        steps=40,
        batch_size=8,
        seq_len=32,
        lr=3e-3,
        temperature=2.0,
        alpha=1.0,
        precision="fp32",
        device=torch.device("cpu"),
        seed=0,
    )
    assert gap() < before / 2
