"""What DP-SGD costs: step time and peak memory per mode, and model quality at epsilon 8 and 3.

    python bench/privacy.py --data ../shared/data/mtsamples.csv [--out runs/bench-privacy]
                            [--skip-federated] [--skip-steps] [--fed-rounds N] [--base FOLDER]

Models are Hugging Face GLM-4s called through `forward_logits`, with the byte-level BPE
tokenizer bench/federated.py trains on generated public notes (`public_tokenizer`).
1. Step time. The same model (the `small` GLM-4 preset, random weights, full fine-tuning) and
   the same batch (16 windows of 128 tokens of this repository's README, every record drawn:
   q = 1) take plain AdamW steps and DP-SGD steps
   in each supported mode, alternated in one process (times on this shared machine drift); the
   median step times give the ratio DP / plain. Modes: `hooks` (the default; bf16 autocast
   where the CPU has native bf16, per-record norms and clipping in fp32), `hooks` in fp32, and
   `ghost` (ghost clipping, fp32). Peak memory: each configuration runs alone in a child process
   that reports its peak resident memory during 3 steps above what it held before them (Linux
   VmHWM, reset first; on a GPU: `torch.cuda.max_memory_allocated`).
2. Quality. MTSamples split into 4 hospitals by specialty (as `fedglm partition` does), the
   federation of bench/federated.yaml (the `tiny` GLM-4 base with random weights of
   bench/federated.py, or --base; 5 rounds or --fed-rounds, 10 local steps, topk uplink at
   10%), run through `fedglm simulate`'s real deployment engine three times: without DP, and
   with each site's budget at epsilon 8 and 3 (delta 1e-5, PRV accountant, sigma calibrated to
   spend the budget over the rounds, q = batch size / records declared public), each with fresh
   site state (ledgers never mix). Printed: the final validation loss of each, with sigma and
   the epsilon each site's ledger reached.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from federated import (  # noqa: E402  (bench/federated.py, beside this script)
    bench_base,
    describe_base,
    make_sites,
    public_tokenizer,
    with_rounds,
)

from fedglm.config import (  # noqa: E402
    FederationConfig,
    Precision,
    PrivacyConfig,
    SimulateConfig,
    load_config,
)
from fedglm.data import window_batch  # noqa: E402
from fedglm.models.causal import forward_logits  # noqa: E402
from fedglm.models.presets import build_glm4, glm4_config  # noqa: E402
from fedglm.models.tokenizer import encode_record  # noqa: E402
from fedglm.privacy.dpsgd import DPMode, train_private  # noqa: E402
from fedglm.simulate import run_simulation  # noqa: E402
from fedglm.training import autocast, lm_loss, make_optimizer, resolve_precision  # noqa: E402

BATCH, SEQ = 16, 128
MODES: dict[str, tuple[DPMode | None, Precision]] = {  # name: (DP mode or None for plain, precision)
    "plain auto": (None, "auto"),
    "dp hooks auto": ("hooks", "auto"),
    "plain fp32": (None, "fp32"),
    "dp hooks fp32": ("hooks", "fp32"),
    "dp ghost fp32": ("ghost", "fp32"),
}
BASELINE = {"dp hooks auto": "plain auto", "dp hooks fp32": "plain fp32", "dp ghost fp32": "plain fp32"}


@functools.cache
def tokenizer() -> PreTrainedTokenizerFast:
    return public_tokenizer()


def step_records() -> list[list[int]]:
    """BATCH records of SEQ + 1 tokens of the README (each fills a window)."""
    ids = encode_record(tokenizer(), (ROOT / "README.md").read_text(encoding="utf-8"))
    if len(ids) < BATCH * (SEQ + 1):
        raise SystemExit(f"README.md has {len(ids)} tokens, fewer than {BATCH} windows of {SEQ + 1}")
    return [ids[i * (SEQ + 1) : (i + 1) * (SEQ + 1)] for i in range(BATCH)]


def small_model() -> torch.nn.Module:
    """The `small` GLM-4 preset for the public tokenizer, random weights (seed 0)."""
    tok = tokenizer()
    config = glm4_config(
        "small", vocab_size=len(tok), bos_token_id=int(tok.bos_token_id), eos_token_id=int(tok.eos_token_id)
    )
    return build_glm4(config, 0)


class Stepper:
    """One configuration's model, optimizer and batch; `run(n)` times n steps."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.mode, requested = MODES[name]
        self.device = device
        self.precision = resolve_precision(requested, device)
        if self.precision == "fp16":
            self.precision = "fp32"
        self.model = small_model().to(device)
        self.optimizer = make_optimizer(self.model, name="adamw", lr=1e-4, momentum=0.9, weight_decay=0.0)
        self.records = step_records()
        inputs, targets = window_batch(
            self.records, list(range(BATCH)), seq_len=SEQ, generator=torch.Generator().manual_seed(0)
        )
        self.inputs, self.targets = inputs.to(device), targets.to(device)

    def run(self, steps: int) -> float:
        """Seconds per step over `steps` steps."""
        start = time.perf_counter()
        if self.mode is None:
            for _ in range(steps):
                with autocast(self.precision, self.device):
                    logits = forward_logits(self.model, self.inputs)
                loss = lm_loss(logits, self.targets)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
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
                precision=self.precision,
                mode=self.mode,
                device=self.device,
                expected_batch_size=float(len(self.records)),
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps


def peak_memory_child(name: str) -> None:
    """Child process: one configuration alone; print its peak memory above its start."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stepper = Stepper(name, device)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the peak (VmHWM) from now
    before = _proc_status_bytes("VmRSS")
    stepper.run(3)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _proc_status_bytes("VmHWM") - before
    print(json.dumps({"name": name, "precision": stepper.precision, "peak_bytes": peak}))


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def step_times(rounds: int, steps: int) -> dict[str, float]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steppers = {name: Stepper(name, device) for name in MODES}
    for stepper in steppers.values():
        stepper.run(1)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in MODES}
    for _ in range(rounds):
        for name, stepper in steppers.items():
            times[name].append(stepper.run(steps))
    print(
        f"\nstep time, small GLM-4 ({sum(p.numel() for p in steppers['plain auto'].model.parameters()):,} "
        f"parameters), batch {BATCH} x {SEQ} tokens, {device.type}, median of {rounds} x {steps} steps"
    )
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, seconds in medians.items():
        base = BASELINE.get(name)
        ratio = f"  ratio to {base}: {seconds / medians[base]:.2f}x" if base else ""
        print(f"  {name:14s} ({steppers[name].precision}) {seconds * 1000:8.1f} ms/step{ratio}")
    return medians


def peak_memory() -> None:
    print("\npeak memory above the process's start, each configuration alone")
    for name in MODES:
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", name], capture_output=True, text=True, check=True
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {name:14s} ({row['precision']}) {row['peak_bytes'] / 2**20:8.0f} MiB")


def federated(data: Path, out: Path, rounds: int | None, given_base: Path | None) -> None:
    folder = bench_base(out, given_base)
    base = with_rounds(load_config(ROOT / "bench" / "federated.yaml", FederationConfig), rounds)
    base = base.model_copy(update={"base": folder})
    variants: dict[str, PrivacyConfig] = {
        "no DP": PrivacyConfig(enabled=False),
        "epsilon 8": PrivacyConfig(epsilon=8.0, delta=1e-5),
        "epsilon 3": PrivacyConfig(epsilon=3.0, delta=1e-5),
    }
    results = []
    for name, privacy in variants.items():
        label = name.replace(" ", "-")
        run_dir = out / "runs" / label
        sites = [
            site.model_copy(update={"state_dir": out / "sites" / label / site.name})
            for site in make_sites(data, out, privacy, base=folder)
        ]
        for site in sites:  # a ledger left by an earlier bench run would decline the rounds
            assert site.state_dir is not None
            shutil.rmtree(site.state_dir, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)
        config = SimulateConfig(
            federation=base.model_copy(update={"require_dp": privacy.enabled}),
            sites=sites,
            release=None,
            pretrain=None,
        )
        started = time.perf_counter()
        rows, ledgers = run_simulation(config, run_dir, on_row=lambda row: None, on_status=lambda s: None)
        results.append((name, rows, ledgers, time.perf_counter() - started))
        print(
            f"  {name:10s} val_loss {rows[-1]['val_loss']:.4f}  ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    print(
        f"\nMTSamples, 4 hospitals, {base.rounds} rounds, base {describe_base(folder)}, "
        f"{base.train.local_steps} local steps, topk uplink {base.compression.uplink.density:g}; "
        "delta 1e-5, PRV, unit: one record"
    )
    baseline = results[0][1][-1]["val_loss"]
    for name, rows, ledgers, seconds in results:
        loss = rows[-1]["val_loss"]
        eps = [f"{row['epsilon']:.3f}" for row in ledgers]
        sigma = [f"{row['sigma']:.3f}" for row in ledgers]
        print(
            f"  {name:10s} final val_loss {loss:.4f} ({100 * (loss - baseline) / baseline:+.1f}% vs no DP)"
            f" bits/byte {rows[-1]['val_bpb']:.4f}"
            + (f"  epsilon per site {', '.join(eps)}  sigma {', '.join(sigma)}" if ledgers else "")
            + f"  {seconds:.0f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="MTSamples CSV (e.g. ../shared/data/mtsamples.csv)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-privacy")
    parser.add_argument("--rounds", type=int, default=5, help="alternation rounds for step times")
    parser.add_argument("--steps", type=int, default=5, help="steps per configuration and round")
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--skip-federated", action="store_true")
    parser.add_argument("--fed-rounds", type=int, help="rounds of the federated part (default: the config's)")
    parser.add_argument(
        "--base", type=Path, help="the federated part's base folder (default: random weights)"
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        peak_memory_child(args.memory_child)
        return
    if not args.skip_steps:
        step_times(args.rounds, args.steps)
        peak_memory()
    if not args.skip_federated:
        if args.data is None:
            parser.error("--data is required for the federated part (or pass --skip-federated)")
        federated(args.data, args.out.absolute(), args.fed_rounds, args.base)


if __name__ == "__main__":
    main()
