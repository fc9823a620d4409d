"""What a public base model buys: final validation loss from random weights against from a base,
without DP and at epsilon 8 and 3, with full fine-tuning and with LoRA adapters.

    python bench/base_model.py --data ../shared/data/mtsamples.csv \
        --public ../shared/data/medquad.jsonl:answer \
        --public ../shared/data/medical_tc_test.csv:medical_abstract \
        [--seeds 3] [--pretrain-steps 1500] [--out runs/bench-base]

1. Base: `fedglm pretrain` of the Hugging Face GLM-4 `tiny` preset (and its byte-level BPE
   tokenizer, 2,000 tokens) on the public files given (`PATH:FIELD`), kept in `<out>/base/`
   and resumed from there. The "random" start is a folder of the same preset and tokenizer
   with random weights (init seed 0), in `<out>/random/`.
2. MTSamples split into 4 hospitals by specialty (bench/federated.py's `make_sites`). One real
   SuperLink and 4 SuperNodes (TLS, loopback) run every configuration with the rounds, local
   steps, batch and topk compression of bench/base_model.yaml, for each seed:
   start {random, base} x fine-tuning {full, lora} x DP {none, epsilon 8, epsilon 3}
   (LoRA from the base only: adapters on random frozen weights have nothing to adapt)
   (delta 1e-5, PRV, sigma calibrated to spend the budget over the run, q = batch / records).
   Each configuration's sites get a fresh state folder (and ledger), so budgets never mix.
Printed: final validation loss (mean and spread over seeds), its change against the same start
and fine-tuning without DP, the epsilon the sites' ledgers reached, and upload bytes per round.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from federated import (  # noqa: E402  (bench/federated.py, beside this script)
    PRESET,
    make_sites,
    random_base,
    run_once,
    site_split,
    with_rounds,
)

from fedglm.app_bundle import fab_bytes  # noqa: E402
from fedglm.atomic import atomic_write_text  # noqa: E402
from fedglm.clients.site import SITE_NAME  # noqa: E402
from fedglm.config import (  # noqa: E402
    DataConfig,
    FederationConfig,
    PretrainConfig,
    PretrainModelConfig,
    PrivacyConfig,
    SiteSpec,
    load_config,
)
from fedglm.data import text_bytes  # noqa: E402
from fedglm.layout import BASE_MODEL_DIR  # noqa: E402
from fedglm.models.base import BaseModel  # noqa: E402
from fedglm.models.tokenizer import encode_records  # noqa: E402
from fedglm.pretrain import pretrain  # noqa: E402
from fedglm.server.submit import ControlClient  # noqa: E402
from fedglm.simulate import ensure_signing_keys, local_stack  # noqa: E402
from fedglm.training import held_out  # noqa: E402

PRIVACY = {
    "no DP": PrivacyConfig(enabled=False),
    "eps 8": PrivacyConfig(epsilon=8.0, delta=1e-5),
    "eps 3": PrivacyConfig(epsilon=3.0, delta=1e-5),
}
STARTS = ("random", "base")
TUNING = ("full", "lora")
WIDTHS = (9, 7, 9, 5, 11)


def public_source(text: str) -> DataConfig:
    path, _, field = text.rpartition(":")
    if not path:
        raise SystemExit(f"--public {text!r}: expected PATH:FIELD")
    return DataConfig(path=Path(path).absolute(), field=field)


def make_base(fed: FederationConfig, sources: list[DataConfig], steps: int, out: Path) -> Path:
    cfg = PretrainConfig(
        model=PretrainModelConfig(preset=PRESET, init_seed=fed.model.init_seed),
        text=sources,
        steps=steps,
        seq_len=fed.train.seq_len,
        out_dir=out / "base",
    )
    started = time.perf_counter()
    manifest = pretrain(
        cfg, on_checkpoint=lambda step, val: print(f"  step {step}: held-out loss {val.loss:.4f}")
    )
    print(
        f"  base: {manifest['steps']} steps on {manifest['train_records']:,} public records, "
        f"held-out loss {manifest['final']['val_loss']:.4f} ({time.perf_counter() - started:.0f} s)"
    )
    return cfg.out_dir / BASE_MODEL_DIR


def before_fine_tuning(base: Path, sites: list[SiteSpec], seq_len: int) -> float:
    """The base's validation loss on the hospitals' validation records, averaged over the sites
    as the federation's evaluation averages them: the loss every "base" run starts from."""
    opened = BaseModel.open(base)
    model, tokenizer = opened.build(lora=None), opened.tokenizer()
    losses = []
    for site in sites:
        val = site_split(site).val
        losses.append(held_out(model, encode_records(tokenizer, val), seq_len, text_bytes(val)).loss)
    return statistics.fmean(losses)


def set_sites(sites: list[SiteSpec], out: Path, privacy: PrivacyConfig, run: str, base: Path) -> None:
    """Point every SuperNode's site spec at this configuration's privacy, base folder and a fresh
    state."""
    for site in sites:
        state = out / "sites" / site.name / run
        shutil.rmtree(state, ignore_errors=True)  # a ledger left by an earlier bench run would decline
        spec = site.model_copy(update={"privacy": privacy, "state_dir": state, "base": base})
        ensure_signing_keys([spec])
        atomic_write_text(out / "sites" / site.name / SITE_NAME, spec.model_dump_json(indent=2) + "\n")


def plan(starts: list[str], tuning: list[str], dps: list[str], seeds: int) -> list[tuple[str, str, str, int]]:
    """Every configuration with all its seeds in turn, those of the target first (from the base,
    without DP and at epsilon 8). LoRA adapters on random frozen weights are left out: there is
    nothing to adapt."""
    grid = [(s, t, d) for s, t, d in itertools.product(starts, tuning, dps) if (s, t) != ("random", "lora")]
    grid.sort(key=lambda c: (c[0] != "base", c[2] == "eps 3", c[1], list(PRIVACY).index(c[2])))
    return [(s, t, d, seed) for s, t, d in grid for seed in range(seeds)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="MTSamples CSV")
    parser.add_argument("--public", action="append", required=True, help="PATH:FIELD of public text")
    parser.add_argument("--config", type=Path, default=ROOT / "bench" / "base_model.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-base")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--rounds", type=int, help="override the config's rounds (fewer: a quicker run)")
    parser.add_argument(
        "--base-lr", type=float, default=2e-3, help="learning rate of full fine-tuning from the base"
    )
    parser.add_argument("--lora-lr", type=float, default=8e-3, help="learning rate of LoRA adapters")
    parser.add_argument("--starts", nargs="+", choices=STARTS, default=list(STARTS))
    parser.add_argument("--tuning", nargs="+", choices=TUNING, default=list(TUNING))
    parser.add_argument("--dp", nargs="+", choices=list(PRIVACY), default=list(PRIVACY))
    args = parser.parse_args()
    out = args.out.absolute()
    fed = with_rounds(load_config(args.config, FederationConfig), args.rounds)
    print("1. base model on public text")
    base = make_base(fed, [public_source(p) for p in args.public], args.pretrain_steps, out)
    starts = {"base": base}
    if "random" in args.starts:
        starts["random"] = random_base(
            out / "random", BaseModel.open(base).tokenizer(), seed=fed.model.init_seed
        )
    sites = make_sites(args.data, out, base=base)
    start_loss = before_fine_tuning(base, sites, fed.train.seq_len)
    print(f"  the base's validation loss on the hospitals' records, before fine-tuning: {start_loss:.4f}")
    runs: dict[tuple[str, str, str], list[list[dict[str, Any]]]] = {}
    print("2. federations on 4 MTSamples hospitals")
    with local_stack(sites, out, on_status=print) as stack:
        client = ControlClient(stack.address, stack.ca_cert)
        fab = fab_bytes()
        try:
            for start, tuning, dp, seed in plan(args.starts, args.tuning, args.dp, args.seeds):
                lr = fed.train.lr if start == "random" else args.base_lr
                if tuning == "lora":
                    lr = args.lora_lr
                train = fed.train.model_copy(update={"adapters": tuning, "lr": lr})
                update: dict[str, Any] = {
                    "seed": seed,
                    "train": train,
                    "require_dp": dp != "no DP",
                    "base": starts[start],
                }
                federation = fed.model_copy(update=update)
                name = f"{start}-{tuning}-{dp.replace(' ', '')}-seed{seed}"
                set_sites(sites, out, PRIVACY[dp], name, starts[start])
                started = time.perf_counter()
                rows = run_once(client, fab, federation, out / "runs" / name)
                if not rows:
                    raise SystemExit(f"{name}: no round finished (see {out / 'runs' / name})")
                runs.setdefault((start, tuning, dp), []).append(rows)
                eps = rows[-1].get("epsilon_max") or 0.0
                up = statistics.fmean(r["upload_bytes"] for r in trained(rows))
                print(
                    f"  {name:28s} val_loss {rows[-1]['val_loss']:.4f}  eps {eps:.2f}  "
                    f"up/round {up:>10,.0f} B  ({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
        finally:
            client.close()
    report(runs, fed, args.seeds)
    print(f"the base before fine-tuning: validation loss {start_loss:.4f}")
    rates = f"random start {fed.train.lr:g}; base, full {args.base_lr:g}; base, LoRA {args.lora_lr:g}"
    print(f"learning rates: {rates}")


def trained(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training rounds' rows (not round 0, where the sites evaluate the base)."""
    return [r for r in rows if r["round"] > 0]


def report(
    runs: dict[tuple[str, str, str], list[list[dict[str, Any]]]], fed: FederationConfig, seeds: int
) -> None:
    up = fed.compression.uplink
    print(
        f"\n4 hospitals, {fed.rounds} rounds x {fed.train.local_steps} local steps, GLM-4 "
        f"{PRESET}, uplink {up.codec} {up.density:g}; means over {seeds} seed(s)"
    )
    header = ["val loss", "spread", "vs no DP", "eps", "up B/round"]
    print(
        f"{'start':7s} {'tuning':6s} {'DP':6s} "
        + " ".join(f"{h:>{w}s}" for h, w in zip(header, WIDTHS, strict=True))
    )
    for (start, tuning, dp), seeded in runs.items():
        finals = [rows[-1]["val_loss"] for rows in seeded]
        loss = statistics.fmean(finals)
        without = runs.get((start, tuning, "no DP"))
        plain = statistics.fmean(rows[-1]["val_loss"] for rows in without) if without else float("nan")
        eps = max((rows[-1].get("epsilon_max") or 0.0) for rows in seeded)
        sent = statistics.fmean(statistics.fmean(r["upload_bytes"] for r in trained(rows)) for rows in seeded)
        cells = [f"{loss:.4f}", f"{max(finals) - min(finals):.4f}", f"{loss / plain - 1:+.2%}", f"{eps:.2f}"]
        cells.append(f"{sent:,.0f}")
        print(
            f"{start:7s} {tuning:6s} {dp:6s} "
            + " ".join(f"{c:>{w}s}" for c, w in zip(cells, WIDTHS, strict=True))
        )


if __name__ == "__main__":
    main()
