"""What fine-tuning a GLM-4 costs per local step, and what a round puts on the wire.

    python bench/hf_models.py [--sizes 30m 120m] [--steps 3] [--rounds 2]

Models: GLM-4 configurations of about 30 M parameters (hidden 512, 6 layers, 8 heads in 4 KV
groups, vocabulary 16 k; 35 M in all) and `120m` (hidden 896, 8 layers, 14 heads in 2 KV
groups, vocabulary 32 k: 119 M in the layers, 177 M with the untied embeddings), random
weights (speed does not depend on them). One batch of 4 records x 128 tokens, every record
drawn (q = 1), AdamW.

1. Seconds per local step, in one process, configurations alternated round by round (times on
   this shared machine drift: read the ratios to plain LoRA): plain LoRA (r = 8 on every
   projection, B trained, A frozen: fedglm/models/lora.py), DP LoRA with Opacus hooks, DP LoRA
   with ghost clipping, and full fine-tuning without DP.
2. Peak memory: each configuration alone in a child process, its peak resident memory (Linux
   VmHWM) during the steps above what it held before.
3. Bytes per round a site uploads, encoded by fedglm's wire format from the change the steps
   made: full fine-tuning dense fp32 (plain FedAvg), full fp16, LoRA (B only) fp16, LoRA topk at
   10 %; each against dense full-model FedAvg.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedglm import compression  # noqa: E402
from fedglm.compression import CODECS, NO_HASH, Header, Kind  # noqa: E402
from fedglm.models.causal import forward_logits  # noqa: E402
from fedglm.models.families import FAMILIES  # noqa: E402
from fedglm.models.lora import LoraSpec, add_adapters, wire_state  # noqa: E402
from fedglm.models.presets import build_glm4, glm4_config  # noqa: E402
from fedglm.privacy.dpsgd import DPMode, train_private  # noqa: E402
from fedglm.training import lm_loss  # noqa: E402

SIZES = {  # name: (vocab, hidden, layers, heads, kv heads, head_dim, channels)
    "30m": (16_000, 512, 6, 8, 4, 64, 1536),
    "120m": (32_000, 896, 8, 14, 2, 64, 4864),
}
CONFIGS: dict[str, tuple[bool, DPMode | None]] = {  # name: (LoRA, DP mode or None)
    "plain LoRA": (True, None),
    "DP LoRA hooks": (True, "hooks"),
    "DP LoRA ghost": (True, "ghost"),
    "full fine-tuning": (False, None),
}
BATCH, SEQ = 4, 128


def make_model(size: str, lora: bool) -> torch.nn.Module:
    vocab, hidden, layers, heads, kv_heads, head_dim, channels = SIZES[size]
    config = glm4_config(
        "small",
        vocab_size=vocab,
        bos_token_id=0,
        eos_token_id=1,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=channels,
    )
    model = build_glm4(config, seed=0)
    if lora:
        return add_adapters(model, LoraSpec(8, 16.0, FAMILIES["Glm4ForCausalLM"].projections, seed=1))
    return model


class Stepper:
    """One configuration: its model, optimizer and records, stepping on demand."""

    def __init__(self, size: str, name: str) -> None:
        lora, self.mode = CONFIGS[name]
        self.model = make_model(size, lora)
        self.start = {k: v.clone() for k, v in wire_state(self.model).items()}
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        vocab = SIZES[size][0]
        generator = torch.Generator().manual_seed(0)
        self.records = [
            torch.randint(2, vocab, (SEQ + 1,), generator=generator).tolist() for _ in range(BATCH)
        ]

    def run(self, steps: int) -> float:
        """Seconds per step of `steps` steps."""
        start = time.perf_counter()
        if self.mode is None:
            batch = torch.tensor(self.records)
            for _ in range(steps):
                self.optimizer.zero_grad(set_to_none=True)
                lm_loss(forward_logits(self.model, batch[:, :-1]), batch[:, 1:]).backward()
                self.optimizer.step()
        else:
            train_private(
                self.model,
                self.records,
                optimizer=self.optimizer,
                q=1.0,
                sigma=1.0,
                clip_norm=1.0,
                steps=steps,
                seq_len=SEQ,
                precision="fp32",
                mode=self.mode,
                device=torch.device("cpu"),
                expected_batch_size=float(BATCH),
            )
        return (time.perf_counter() - start) / steps

    def change(self, lora_only: bool) -> dict[str, torch.Tensor]:
        now = wire_state(self.model)
        names = [n for n in now if (".lora_B." in n) == lora_only]
        return {n: now[n].float() - self.start[n].float() for n in names}


def upload_bytes(change: dict[str, torch.Tensor], codec: str, density: float = 1.0) -> int:
    arrays = {n: t.reshape(-1).numpy().astype(np.float32) for n, t in change.items()}
    shapes = {n: tuple(t.shape) for n, t in change.items()}
    header = Header(Kind.UPDATE, CODECS[codec].codec_id, 1, NO_HASH, NO_HASH)
    return len(compression.encode(arrays, shapes, CODECS[codec], header, density=density, selection="global"))


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_child(size: str, name: str, steps: int) -> None:
    stepper = Stepper(size, name)
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from here
    before = _status_bytes("VmRSS")
    stepper.run(steps)
    print(json.dumps({"peak": _status_bytes("VmHWM") - before, "held": before}))


def bench_size(size: str, steps: int, rounds: int) -> None:
    steppers = {name: Stepper(size, name) for name in CONFIGS}
    params = sum(p.numel() for p in make_model(size, lora=False).parameters())
    for stepper in steppers.values():
        stepper.run(1)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for _ in range(rounds):
        for name, stepper in steppers.items():
            times[name].append(stepper.run(steps))
    base = statistics.median(times["plain LoRA"])
    print(f"\nGLM-4 {size}: {params / 1e6:.1f} M parameters, batch {BATCH} x {SEQ}, fp32, CPU")
    print(f"{'configuration':<18} {'s/step':>8} {'x plain LoRA':>13} {'peak MB':>8} {'held MB':>8}")
    for name in CONFIGS:
        out = subprocess.run(
            [sys.executable, __file__, "--peak", size, name, "--steps", str(steps)],
            capture_output=True,
            text=True,
            check=True,
        )
        memory = json.loads(out.stdout.strip().splitlines()[-1])
        median = statistics.median(times[name])
        print(
            f"{name:<18} {median:>8.3f} {median / base:>12.2f}x "
            f"{memory['peak'] / 2**20:>8.0f} {memory['held'] / 2**20:>8.0f}"
        )
    full = steppers["full fine-tuning"].change(lora_only=False)
    lora = steppers["DP LoRA hooks"].change(lora_only=True)
    dense = upload_bytes(full, "dense")
    rows = {
        "full, dense fp32 (FedAvg)": dense,
        "full, fp16": upload_bytes(full, "fp16"),
        "LoRA B, fp16": upload_bytes(lora, "fp16"),
        "LoRA B, topk 10%": upload_bytes(lora, "topk", 0.1),
    }
    print(f"{'upload per site per round':<28} {'bytes':>12} {'x smaller':>10}")
    for label, size_bytes in rows.items():
        print(f"{label:<28} {size_bytes:>12,} {dense / size_bytes:>9.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per configuration")
    parser.add_argument("--peak", nargs=2, metavar=("SIZE", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.peak:
        peak_child(args.peak[0], args.peak[1], args.steps)
        return
    for size in args.sizes:
        bench_size(size, args.steps, args.rounds)


if __name__ == "__main__":
    main()
