"""Averaging LoRA adapters: how far naive FedAvg of A and B is from the sites' mean change,
and what fedglm's frozen-A aggregation (fedglm/models/lora.py) gives instead.

    python bench/lora_aggregation.py --data ../shared/data/medquad.jsonl [--field answer]

A GLM-4 of the `tiny` preset with a byte-level BPE tokenizer trained on the first 2,000 records
is briefly pretrained (plain, 150 steps) on them; three sites then start from the same global
adapters (r = 8 on every projection) and train AdamW on their own shards of the next records.
For each setting of local training (steps, learning rate), two runs side by side:
- naive: A and B both trained, averaged separately (plain FedAvg of the adapter tensors); its
  error is the relative Frobenius distance, over all adapted weights, between the merged
  change of the averaged adapters and the mean of the sites' merged changes (what exact
  averaging would give);
- frozen A: A fixed from the seed, only B trained; averaging B gives the mean change exactly
  (the same distance is printed, it is rounding).
Printed for each: the error, and the held-out loss of the naive average, of the exact mean
change, and of the frozen-A average.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedglm.data import load_records, sample_batches  # noqa: E402
from fedglm.models.families import FAMILIES  # noqa: E402
from fedglm.models.lora import LoraSpec, add_adapters, load_wire_state, merge_adapters, wire_state  # noqa: E402
from fedglm.models.presets import build_glm4, glm4_config  # noqa: E402
from fedglm.models.tokenizer import encode_records, train_tokenizer  # noqa: E402
from fedglm.training import evaluate, train_local  # noqa: E402

SETTINGS = [(20, 1e-3), (20, 1e-2), (50, 3e-2)]  # (local steps, learning rate)
SITES, SEQ, BATCH = 3, 64, 8
CPU = torch.device("cpu")


def _train(model: torch.nn.Module, records: list[list[int]], steps: int, lr: float, seed: int) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    batches = sample_batches(
        records, batch_size=BATCH, seq_len=SEQ, generator=torch.Generator().manual_seed(seed)
    )
    optimizer = torch.optim.AdamW(params, lr=lr)
    train_local(model, batches, optimizer=optimizer, steps=steps, precision="fp32", grad_clip=1.0, device=CPU)


def _loss(model: torch.nn.Module, records: list[list[int]]) -> float:
    n_bytes = sum(len(r) for r in records)  # bits per byte are not reported: any positive count
    return evaluate(
        model, records, seq_len=SEQ, batch_size=32, precision="fp32", device=CPU, n_bytes=n_bytes
    ).loss


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--field", default="answer")
    args = parser.parse_args()
    texts = [t for t in load_records(args.data, field=args.field) if len(t) >= 50]
    public, rest = texts[:2000], texts[2000:]
    tokenizer = train_tokenizer(public, vocab_size=2000)
    public_ids, rest_ids = (
        encode_records(tokenizer, public),
        encode_records(tokenizer, rest[: SITES * 300 + 200]),
    )
    shards = [rest_ids[i * 300 : (i + 1) * 300] for i in range(SITES)]
    held_out = rest_ids[SITES * 300 :]
    config = glm4_config("tiny", vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1)
    base = build_glm4(config, seed=0)
    _train(base, public_ids, 150, 3e-3, seed=0)
    base_state = {k: v.clone() for k, v in wire_state(base).items()}
    targets = FAMILIES["Glm4ForCausalLM"].projections
    spec = LoraSpec(8, 16.0, targets, seed=1)

    def adapted(train_a: bool) -> torch.nn.Module:
        model = build_glm4(config, seed=0)
        load_wire_state(model, base_state)
        model = add_adapters(model, spec)
        if train_a:  # naive LoRA: A trains too, from the same seeded start, B from zero
            for name, p in model.named_parameters():
                if ".lora_A." in name:
                    p.requires_grad_(True)
        return model

    print(f"base model: held-out loss {_loss(adapted(False), held_out):.3f}")
    print(
        f"{'steps':>5} {'lr':>6} {'naive error':>12} {'frozen-A error':>15} {'loss naive':>11} "
        f"{'loss exact mean':>16} {'loss frozen A':>14}"
    )
    for steps, lr in SETTINGS:
        results = {}
        for train_a in (True, False):
            sites = []
            for site, shard in enumerate(shards):
                model = adapted(train_a)
                _train(model, shard, steps, lr, seed=10 + site)
                sites.append({k: v.clone() for k, v in wire_state(model).items()})
            averaged = {name: torch.stack([s[name] for s in sites]).mean(0) for name in sites[0]}
            merged = merge_adapters(averaged, spec.scale)
            exact = {
                name: torch.stack([merge_adapters(s, spec.scale)[name] for s in sites]).mean(0)
                for name in merged
            }
            adapted_names = [
                n[: -len(".lora_A.weight")] + ".weight" for n in averaged if n.endswith("lora_A.weight")
            ]
            gap = sum(float((merged[n] - exact[n]).norm() ** 2) for n in adapted_names) ** 0.5
            change = sum(float((exact[n] - base_state[n]).norm() ** 2) for n in adapted_names) ** 0.5
            plain = build_glm4(config, seed=0)
            load_wire_state(plain, merged)
            reference = build_glm4(config, seed=0)
            load_wire_state(reference, exact)
            results[train_a] = (gap / change, _loss(plain, held_out), _loss(reference, held_out))
        (naive_err, naive_loss, exact_loss), (ffa_err, ffa_loss, _) = results[True], results[False]
        print(
            f"{steps:>5} {lr:>6.0e} {naive_err:>11.1%} {ffa_err:>14.1e} {naive_loss:>11.3f} "
            f"{exact_loss:>16.3f} {ffa_loss:>14.3f}"
        )


if __name__ == "__main__":
    main()
