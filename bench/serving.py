"""What serving costs after pruning, distillation and export: latency and bits per byte.

    python bench/serving.py --data ../shared/data/mtsamples.csv
                            [--proxy ../shared/data/medquad.jsonl --proxy-field answer]
                            [--out runs/bench-serving] [--run DIR]

1. Teacher: MTSamples split into 4 hospitals by specialty (bench/federated.py's `make_sites`),
   the `small` preset (3.3 M parameters) trained for 4 rounds through `fedglm simulate`'s real
   deployment engine (no DP: this measures serving, bench/privacy.py measures DP). `--run`
   reuses a finished run folder instead.
2. Pruned: the teacher with 25% of its heads and SwiGLU channels removed by the coordinator's
   criterion (`fedglm/pruning.py`), recovered by distillation from the teacher at full depth.
   Student: 1 of the teacher's 4 layers, keeping 75% of its heads and 50% of its channels,
   distilled. Both on public proxy text (MedQuAD answers by default), never on the hospitals'
   records.
3. Exported: the student as ONNX fp32 and INT8 (dynamic, per channel) in ONNX Runtime.
Each model's latency at batch 1 and 8, sequence 128, on one CPU thread (medians, all models
timed in turns in this one process), and its bits per byte on the hospitals' held-out
MTSamples records; ratios are to the teacher in torch eager.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from federated import make_sites  # noqa: E402  (bench/federated.py, beside this script)

from fedglm.config import (  # noqa: E402
    DataConfig,
    DistillConfig,
    FederationConfig,
    PublicTextConfig,
    ReleaseConfig,
    SimulateConfig,
)
from fedglm.data import encode, load_records, split_records  # noqa: E402
from fedglm.distill import distill, make_student  # noqa: E402
from fedglm.export.onnx import OnnxLM, check_parity, export_onnx, quantize_int8  # noqa: E402
from fedglm.model import GLM, count_parameters  # noqa: E402
from fedglm.release import final_model, held_out, public_text  # noqa: E402
from fedglm.simulate import run_simulation  # noqa: E402

FEDERATION = {
    "rounds": 4,
    "min_clients": 4,
    "require_dp": False,
    "model": {"preset": "small"},
    "train": {"optimizer": "adamw", "lr": 0.002, "local_steps": 15, "batch_size": 16, "seq_len": 128},
}
SEQ = 128
WIDTHS = (9, 8, 6, 8, 6, 10, 10)


def train_teacher(data: Path, out: Path) -> Path:
    run = out / "federation"
    shutil.rmtree(run, ignore_errors=True)
    sites = make_sites(data, run)
    config = SimulateConfig(federation=FederationConfig.model_validate(FEDERATION), sites=sites, release=None)
    run_simulation(
        config,
        run,
        on_row=lambda row: print("  round", row["round"], "val_loss", row["val_loss"]),
        on_status=lambda s: None,
    )
    return run


def held_out_records(run: Path) -> list[list[int]]:
    """Every hospital's validation split, exactly as the sites split their records."""
    records: list[list[int]] = []
    for path in sorted((run / "data").glob("*.jsonl")):
        texts = load_records(path, "jsonl", "text")
        records += [encode(t) for t in split_records(texts, DataConfig(path=path).val_fraction, 0).val]
    return records


def distilled(teacher: GLM, text: list[list[int]], *, layers: int, heads: float, channels: float) -> GLM:
    student = make_student(teacher, layers=layers, heads=heads, channels=channels)
    settings = DistillConfig()
    distill(
        teacher,
        student,
        text,
        steps=400,
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


def latencies(models: dict[str, torch.nn.Module], batch: int, repeats: int) -> dict[str, float]:
    """Median seconds per forward pass of each model, timed in turns."""
    tokens = torch.randint(0, 256, (batch, SEQ), generator=torch.Generator().manual_seed(batch))
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(tokens)  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(tokens)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="mtsamples.csv")
    parser.add_argument("--proxy", type=Path, default=ROOT.parent / "shared" / "data" / "medquad.jsonl")
    parser.add_argument("--proxy-field", default="answer")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-serving")
    parser.add_argument("--run", type=Path, help="a finished run folder to take the teacher from")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    print("1. federation on MTSamples (small preset, 4 hospitals)")
    run = args.run or train_teacher(args.data, args.out)
    teacher = final_model(run)
    val = held_out_records(run)
    proxy = public_text(
        ReleaseConfig(
            public_text=PublicTextConfig(
                data=DataConfig(path=args.proxy, format="jsonl", field=args.proxy_field)
            )
        )
    )
    text = [encode(t) for t in proxy.train[:20000]]
    print(f"2. distillation on {len(text)} public records of {args.proxy.name}")
    pruned = distilled(teacher, text, layers=teacher.args.n_layers, heads=0.25, channels=0.25)
    student = distilled(teacher, text, layers=1, heads=0.25, channels=0.5)
    print("3. export")
    fp32, int8 = args.out / "student.onnx", args.out / "student.int8.onnx"
    export_onnx(student, fp32, max_batch=8)
    quantize_int8(fp32, int8)
    models: dict[str, torch.nn.Module] = {
        "teacher (torch eager)": teacher,
        "pruned (torch eager)": pruned,
        "student (torch eager)": student,
        "student ONNX fp32 (ORT)": OnnxLM(fp32, threads=1),
        "student ONNX INT8 (ORT)": OnnxLM(int8, threads=1),
    }
    params = {name: count_parameters(m) for name, m in models.items() if isinstance(m, GLM)}
    bpb = {name: held_out(model, val, SEQ).bits_per_byte for name, model in models.items()}
    agreement = check_parity(student, models["student ONNX INT8 (ORT)"], "int8", val, seq_len=SEQ, batches=8)
    torch.set_num_threads(1)  # latency on one thread; training above used every core
    timing = {batch: latencies(models, batch, args.repeats) for batch in (1, 8)}

    base = "teacher (torch eager)"
    print(
        f"\nheld-out: {len(val)} MTSamples validation records of the 4 hospitals; one CPU thread, seq {SEQ}"
    )
    header = ["model", "params", "b1 ms", "x", "b8 ms", "x", "bits/byte", "vs teacher"]
    print(f"{header[0]:26} " + " ".join(f"{h:>{w}}" for h, w in zip(header[1:], WIDTHS, strict=True)))
    for name in models:
        row: list[Any] = [name, f"{params[name]:,}" if name in params else "(student)"]
        for batch in (1, 8):
            row += [f"{timing[batch][name] * 1e3:.2f}", f"{timing[batch][base] / timing[batch][name]:.2f}"]
        row += [f"{bpb[name]:.4f}", f"{100 * (bpb[name] / bpb[base] - 1):+.2f}%"]
        print(f"{row[0]:26} " + " ".join(f"{c:>{w}}" for c, w in zip(row[1:], WIDTHS, strict=True)))
    print(
        f"INT8 vs fp32 student: next-token agreement {agreement.agreement:.4f} over {agreement.tokens} tokens"
    )


if __name__ == "__main__":
    main()
