"""What serving costs after pruning, distillation and export: latency and bits per byte.

    python bench/serving.py --data ../shared/data/mtsamples.csv
                            [--proxy ../shared/data/medquad.jsonl --proxy-field answer]
                            [--pretrain-steps 300] [--rounds 4] [--distill-steps 400]
                            [--val-records N] [--out runs/bench-serving] [--run DIR]

0. Base: the Hugging Face GLM-4 `small` preset (hidden 256, 4 layers, 8 heads in 4 KV groups,
   688 channels) with its byte-level BPE tokenizer, pretrained by `fedglm pretrain` on the
   public proxy text (MedQuAD answers by default) for --pretrain-steps steps, kept in
   `<out>/base/` (resumed from there).
1. Teacher: MTSamples split into 4 hospitals by specialty (bench/federated.py's `make_sites`,
   into `<out>/data/`),
   the base fine-tuned (full, no DP: this measures serving, bench/privacy.py measures DP) for
   --rounds rounds through `fedglm simulate`'s real deployment engine. `--run` reuses a
   finished run folder instead.
2. Pruned: the teacher with 25% of its heads and SwiGLU channels removed by the coordinator's
   criterion (`fedglm/models/pruning.py`; heads go in equal numbers from every KV group, so
   with groups of 2 a quarter rounds to none), recovered by distillation from the teacher at
   full depth. Student: 1 of the teacher's 4 layers, keeping 75% of its heads and 50% of its
   channels (same rounding), distilled. Both on the public proxy text, never on the
   hospitals' records; the printed shapes are what was kept.
3. Exported: the student as ONNX fp32 (`export/causal_onnx.export_logits`) and INT8 (dynamic,
   per channel) in ONNX Runtime.
Each model's latency at batch 1 and 8, sequence 128, on one CPU thread (medians, all models
timed in turns in this one process, through `forward_logits`), and its bits per byte on the
hospitals' held-out MTSamples records (the base's tokenizer; bits per UTF-8 byte of the text;
`--val-records N`: the first N of them, every hospital's in turn), ratios to the teacher in
torch eager.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from federated import make_sites, site_split  # noqa: E402  (bench/federated.py, beside this script)

from fedglm.config import (  # noqa: E402
    DataConfig,
    DistillConfig,
    FederationConfig,
    PretrainConfig,
    PretrainModelConfig,
    PublicTextConfig,
    SimulateConfig,
    SiteSpec,
)
from fedglm.data import text_bytes  # noqa: E402
from fedglm.distill import distill, make_student  # noqa: E402
from fedglm.export.causal_onnx import export_logits  # noqa: E402
from fedglm.export.onnx import OnnxLM, check_parity, quantize_int8  # noqa: E402
from fedglm.layout import BASE_MODEL_DIR  # noqa: E402
from fedglm.models.causal import forward_logits  # noqa: E402
from fedglm.models.families import describe  # noqa: E402
from fedglm.models.tokenizer import encode_records  # noqa: E402
from fedglm.pretrain import pretrain  # noqa: E402
from fedglm.public_text import public_text  # noqa: E402
from fedglm.release import final_model, run_base  # noqa: E402
from fedglm.simulate import run_simulation  # noqa: E402
from fedglm.training import held_out  # noqa: E402

FEDERATION = {
    "rounds": 4,
    "min_clients": 4,
    "require_dp": False,
    "train": {"optimizer": "adamw", "lr": 0.002, "local_steps": 15, "batch_size": 16, "seq_len": 128},
}
SEQ = 128
WIDTHS = (9, 8, 6, 8, 6, 10, 10)


def make_base(proxy: DataConfig, steps: int, out: Path) -> Path:
    """The `small` GLM-4 pretrained on the public proxy text (resumed from `<out>/base`)."""
    cfg = PretrainConfig(
        model=PretrainModelConfig(preset="small"),
        text=[proxy],
        steps=steps,
        seq_len=SEQ,
        out_dir=out / "base",
    )
    started = time.perf_counter()
    manifest = pretrain(
        cfg, on_checkpoint=lambda step, val: print(f"  step {step}: held-out loss {val.loss:.4f}")
    )
    print(
        f"  base: {manifest['parameters']:,} parameters, vocabulary {manifest['vocab_size']}, "
        f"{manifest['steps']} steps on {manifest['train_records']:,} public records, held-out loss "
        f"{manifest['final']['val_loss']:.4f}, {manifest['final']['val_bits_per_byte']:.4f} bits/byte "
        f"({time.perf_counter() - started:.0f} s)"
    )
    return cfg.out_dir / BASE_MODEL_DIR


def train_teacher(sites: list[SiteSpec], base: Path, rounds: int, out: Path) -> Path:
    run = out / "federation"
    shutil.rmtree(run, ignore_errors=True)
    for site in sites:  # fresh site state (held model, residuals) for a fresh run
        if site.state_dir is not None:
            shutil.rmtree(site.state_dir, ignore_errors=True)
    federation = FederationConfig.model_validate({**FEDERATION, "rounds": rounds, "base": base})
    config = SimulateConfig(federation=federation, sites=sites, release=None, pretrain=None)
    run_simulation(
        config,
        run,
        on_row=lambda row: print("  round", row["round"], "val_loss", row["val_loss"]),
        on_status=lambda s: None,
    )
    return run


def held_out_records(
    sites: list[SiteSpec], tokenizer: PreTrainedTokenizerFast, limit: int | None = None
) -> tuple[list[list[int]], int]:
    """Every hospital's validation split, exactly as the sites split their records (the first
    `limit` records, taken from the hospitals in turn), tokenised with the base's tokenizer;
    and the UTF-8 bytes of those texts."""
    splits = [site_split(site).val for site in sites]
    texts = [t for group in itertools.zip_longest(*splits) for t in group if t is not None][:limit]
    return encode_records(tokenizer, texts), text_bytes(texts)


def distilled(
    teacher: torch.nn.Module, text: list[list[int]], *, layers: int, heads: float, channels: float, steps: int
) -> torch.nn.Module:
    student = make_student(teacher, layers=layers, heads=heads, channels=channels)
    settings = DistillConfig()
    distill(
        teacher,
        student,
        text,
        steps=steps,
        batch_size=16,
        seq_len=SEQ,
        lr=settings.lr,
        temperature=settings.temperature,
        alpha=settings.alpha,
        precision="fp32",
        device=torch.device("cpu"),
        seed=0,
    )
    return student.eval()


def shape(model: torch.nn.Module) -> str:
    d = describe(model)
    return f"{d['layers']} layers x {d['heads'][0]} heads x {d['ffn_channels'][0]} channels"


def latencies(models: dict[str, torch.nn.Module], vocab: int, batch: int, repeats: int) -> dict[str, float]:
    """Median seconds per forward pass of each model, timed in turns."""
    tokens = torch.randint(0, vocab, (batch, SEQ), generator=torch.Generator().manual_seed(batch))
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            forward_logits(model, tokens)  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                forward_logits(model, tokens)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="mtsamples.csv")
    parser.add_argument("--proxy", type=Path, default=ROOT.parent / "shared" / "data" / "medquad.jsonl")
    parser.add_argument("--proxy-field", default="answer")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-serving")
    parser.add_argument("--run", type=Path, help="a finished run folder to take the teacher from")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="public pretraining of the base")
    parser.add_argument("--rounds", type=int, default=FEDERATION["rounds"], help="federated rounds")
    parser.add_argument("--distill-steps", type=int, default=400, help="steps of each distillation")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--val-records", type=int, help="held-out records scored (default: all)")
    args = parser.parse_args()
    out = args.out.absolute()
    proxy = DataConfig(path=args.proxy.absolute(), format="jsonl", field=args.proxy_field)

    if args.run is None:
        print(f"0. base model: small preset pretrained on {args.proxy.name}")
        base = make_base(proxy, args.pretrain_steps, out)
        sites = make_sites(args.data, out, base=base)
        print(f"1. federation on MTSamples ({args.rounds} rounds, 4 hospitals)")
        run = train_teacher(sites, base, args.rounds, out)
    else:
        run = args.run.absolute()
        sites = make_sites(args.data, out)  # the same partition (deterministic)
    teacher = final_model(run)
    tokenizer = run_base(run).tokenizer()
    val, val_bytes = held_out_records(sites, tokenizer, args.val_records)
    text = encode_records(tokenizer, public_text(PublicTextConfig(data=proxy)).train)
    print(f"2. distillation on {len(text)} public records of {args.proxy.name}, {args.distill_steps} steps")
    layers = int(teacher.config.num_hidden_layers)
    pruned = distilled(teacher, text, layers=layers, heads=0.25, channels=0.25, steps=args.distill_steps)
    student = distilled(teacher, text, layers=1, heads=0.25, channels=0.5, steps=args.distill_steps)
    print("3. export")
    fp32, int8 = out / "student.onnx", out / "student.int8.onnx"
    export_logits(student, fp32, max_batch=8)
    quantize_int8(fp32, int8)
    models: dict[str, torch.nn.Module] = {
        "teacher (torch eager)": teacher,
        "pruned (torch eager)": pruned,
        "student (torch eager)": student,
        "student ONNX fp32 (ORT)": OnnxLM(fp32, threads=1),
        "student ONNX INT8 (ORT)": OnnxLM(int8, threads=1),
    }
    torch_models = {name: m for name, m in models.items() if not isinstance(m, OnnxLM)}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in torch_models.items()}
    bpb = {name: held_out(model, val, SEQ, val_bytes).bits_per_byte for name, model in models.items()}
    agreement = check_parity(student, models["student ONNX INT8 (ORT)"], "int8", val, seq_len=SEQ, batches=8)
    torch.set_num_threads(1)  # latency on one thread; training above used every core
    vocab = int(teacher.config.vocab_size)
    timing = {batch: latencies(models, vocab, batch, args.repeats) for batch in (1, 8)}

    base_name = "teacher (torch eager)"
    print(
        f"\nheld-out: {len(val)} MTSamples validation records of the 4 hospitals ({val_bytes:,} bytes); "
        f"one CPU thread, seq {SEQ}"
    )
    for name, model in torch_models.items():
        print(f"  {name}: {shape(model)}")
    header = ["model", "params", "b1 ms", "x", "b8 ms", "x", "bits/byte", "vs teacher"]
    print(f"{header[0]:26} " + " ".join(f"{h:>{w}}" for h, w in zip(header[1:], WIDTHS, strict=True)))
    for name in models:
        row: list[Any] = [name, f"{params[name]:,}" if name in params else "(student)"]
        for batch in (1, 8):
            row += [
                f"{timing[batch][name] * 1e3:.2f}",
                f"{timing[batch][base_name] / timing[batch][name]:.2f}",
            ]
        row += [f"{bpb[name]:.4f}", f"{100 * (bpb[name] / bpb[base_name] - 1):+.2f}%"]
        print(f"{row[0]:26} " + " ".join(f"{c:>{w}}" for c, w in zip(row[1:], WIDTHS, strict=True)))
    print(
        f"INT8 vs fp32 student: next-token agreement {agreement.agreement:.4f} over {agreement.tokens} tokens"
    )


if __name__ == "__main__":
    main()
