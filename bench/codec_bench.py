"""Every codec on real and synthetic updates: size, error, speed against memcpy, index bits.

    python bench/codec_bench.py --data ../shared/data/mtsamples.csv [--synthetic-size 100000000]

Updates measured:
- `small/adamw` and `small/sgd`: the change of the `small` Hugging Face GLM-4 preset (random
  weights, full fine-tuning; bench/federated.py's public BPE tokenizer) after one local round
  (20 steps, batch 16 x 128 tokens) on MTSamples notes, with AdamW and with SGD+momentum (the
  two give differently shaped updates: flat against heavy-tailed);
- `synthetic`: 100 M values, heavy-tailed (Student t, 3 degrees of freedom, times a log-normal
  per-row scale), as one tensor.
For each codec and density: payload bytes, ratio to dense fp32, relative L2 error, encode and
decode+accumulate throughput in GB/s of fp32 values, and both as a fraction of a memcpy of the
same values timed in the same run (best of 3); for sparse codecs the index bits per kept value
against the uniform bound log2 C(N, k) / k. Selection is global (one threshold per model).
"""

from __future__ import annotations

import argparse
import math
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from federated import public_tokenizer  # noqa: E402  (bench/federated.py, beside this script)

from fedglm.compression import CODECS  # noqa: E402
from fedglm.compression.update import encode_tensors  # noqa: E402
from fedglm.data import load_records, sample_batches  # noqa: E402
from fedglm.models.lora import wire_state  # noqa: E402
from fedglm.models.presets import build_glm4, glm4_config  # noqa: E402
from fedglm.models.tokenizer import encode_records  # noqa: E402
from fedglm.training import make_optimizer, resolve_precision, train_local  # noqa: E402

SPARSE_DENSITIES = (0.1, 0.01, 0.001)
Update = dict[str, np.ndarray]


def best_of(repeats: int, f: Callable[[], object]) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - start)
    return best


def real_update(data: Path, optimizer: str, steps: int) -> Update:
    tokenizer = public_tokenizer()
    records = encode_records(tokenizer, load_records(data, "csv", "transcription")[:2000])
    config = glm4_config(
        "small",
        vocab_size=len(tokenizer),
        bos_token_id=int(tokenizer.bos_token_id),
        eos_token_id=int(tokenizer.eos_token_id),
    )
    model = build_glm4(config, 0)
    before = {k: v.clone() for k, v in wire_state(model).items()}
    lr = 1e-3 if optimizer == "adamw" else 0.3
    train_local(
        model,
        sample_batches(records, batch_size=16, seq_len=128, generator=torch.Generator().manual_seed(0)),
        optimizer=make_optimizer(model, name=optimizer, lr=lr, momentum=0.9, weight_decay=0.0),
        steps=steps,
        precision=resolve_precision("auto", torch.device("cpu")),
        grad_clip=1.0,
        device=torch.device("cpu"),
    )
    return {k: (v.float() - before[k]).reshape(-1).numpy().copy() for k, v in wire_state(model).items()}


def synthetic_update(n: int) -> Update:
    rng = np.random.default_rng(0)
    rows = max(1, n // 4096)
    values = rng.standard_t(3, size=n).astype(np.float32)
    scale = np.exp(rng.normal(0.0, 1.0, size=rows)).astype(np.float32)
    values[: rows * 4096].reshape(rows, -1)[:] *= scale[:, None]
    return {"synthetic": values}


def index_bits(table: list[tuple[str, tuple[int, ...], bytes]], codec: str) -> tuple[int, int]:
    """(index bytes, kept values) over a sparse payload's tensor bodies."""
    offset = 5 if codec == "topk" else 8  # block follows k (u32) and e (i8) / mu (f32)
    index_bytes = kept = 0
    for _, _, body in table:
        kept += struct.unpack_from("<I", body)[0]
        index_bytes += 5 + struct.unpack_from("<I", body, offset + 1)[0]
    return index_bytes, kept


def bound_bits(n: int, k: int) -> float:
    if k == 0 or k >= n:
        return 0.0
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2) / k


def measure(name: str, update: Update, repeats: int) -> None:
    shapes = {k: (v.size,) for k, v in update.items()}
    n = sum(v.size for v in update.values())
    dense_bytes = 4 * n
    norm = math.sqrt(sum(float(np.dot(v, v)) for v in update.values()))
    copies = {k: np.empty_like(v) for k, v in update.items()}

    def copy_all() -> None:
        for k, v in update.items():
            np.copyto(copies[k], v)

    memcpy = dense_bytes / best_of(3, copy_all) / 1e9
    print(f"\n== {name}: {n:,} values, dense fp32 {dense_bytes:,} B; memcpy {memcpy:.1f} GB/s")
    print(
        f"{'codec':9s} {'density':>8s} {'bytes':>12s} {'ratio':>8s} {'rel.err':>8s} "
        f"{'enc GB/s':>9s} {'/memcpy':>8s} {'dec GB/s':>9s} {'/memcpy':>8s} "
        f"{'idx bits':>9s} {'bound':>6s} {'x bnd':>6s}"
    )
    accumulator = {k: np.zeros_like(v) for k, v in update.items()}
    for codec_name, codec in CODECS.items():
        for density in SPARSE_DENSITIES if codec.sparse else (1.0,):
            encode_s = math.inf
            for _ in range(repeats):
                copy_all()  # encoding turns its input into the residual: start from the update
                start = time.perf_counter()
                table, decoded = encode_tensors(copies, shapes, codec, density=density, selection="global")
                encode_s = min(encode_s, time.perf_counter() - start)
            error = math.sqrt(
                sum(float(np.sum((update[k] - decoded[k].dense(update[k].size)) ** 2)) for k in decoded)
                + sum(float(np.dot(update[k], update[k])) for k in update if k not in decoded)
            )
            size = sum(len(body) for _, _, body in table)

            decode_s = math.inf
            for _ in range(repeats):
                start = time.perf_counter()
                for tensor_name, _, body in table:
                    codec.decode(memoryview(body), update[tensor_name].size).add_to(accumulator[tensor_name])
                decode_s = min(decode_s, time.perf_counter() - start)
            enc, dec = dense_bytes / encode_s / 1e9, dense_bytes / decode_s / 1e9
            line = (
                f"{codec_name:9s} {density:8.3f} {size:12,d} {dense_bytes / size:8.1f} {error / norm:8.4f} "
                f"{enc:9.2f} {enc / memcpy:8.2f} {dec:9.2f} {dec / memcpy:8.2f}"
            )
            if codec.sparse:
                idx_bytes, kept = index_bits(table, codec_name)
                bits = 8 * idx_bytes / max(kept, 1)
                bound = bound_bits(n, kept)
                line += f" {bits:9.2f} {bound:6.2f} {bits / bound:6.2f}"
            print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, required=True, help="MTSamples CSV (e.g. ../shared/data/mtsamples.csv)"
    )
    parser.add_argument("--synthetic-size", type=int, default=100_000_000)
    parser.add_argument("--steps", type=int, default=20, help="local steps of the real updates")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    for optimizer in ("adamw", "sgd"):
        measure(f"small/{optimizer}", real_update(args.data, optimizer, args.steps), args.repeats)
    measure("synthetic heavy-tailed", synthetic_update(args.synthetic_size), args.repeats)


if __name__ == "__main__":
    main()
