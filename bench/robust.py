"""What robust aggregation costs on a clean run: final validation loss of the coordinate-wise
trimmed mean and median against the mean, with no hostile site.

    python bench/robust.py --data ../shared/data/mtsamples.csv [--seeds 1] [--rounds N]
                           [--uplink fp16] [--only median] [--trim-fraction 0.25]
                           [--base FOLDER] [--out runs/bench-robust]

MTSamples is partitioned into 4 hospitals by specialty (bench/federated.py's `make_sites`). One
real SuperLink and 4 SuperNodes (TLS, loopback) then run, for each seed, the federation of
bench/federated.yaml (same base: the GLM-4 `tiny` preset with random weights of
bench/federated.py's `random_base`, or --base; same rounds, local training and data; its
default compression, topk 10% uplink) once per aggregation rule (`federation.aggregation`):
- `mean`: the default weighted mean (uniform weights), the baseline;
- `trimmed-mean`: with --trim-fraction 0.25, which drops one site at each end of every
  coordinate among 4 (the config default 0.2 would drop floor(0.2 x 4) = 0: the plain mean);
- `median`: with 4 sites, the mean of the two middle values of every coordinate (so with 4
  sites and one dropped at each end, the trimmed mean is the median: the same arithmetic).
Every run is clean: all sites honest, so whatever the robust rules lose is their price.
Printed: validation loss after each round, then the final validation loss of each rule, its
ratio to the mean's and the relative difference (means over seeds). `--uplink` replaces the
uplink codec (e.g. `fp16`, dense) to separate the rules' own cost from their interaction with
sparse updates (robust.py: an unsent coordinate counts as zero). No timing is claimed: the
runs share a small machine with other work.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from federated import bench_base, describe_base, make_sites, run_once  # noqa: E402  (bench/federated.py, beside this script)

from fedglm.app_bundle import fab_bytes  # noqa: E402
from fedglm.compression import CODECS  # noqa: E402
from fedglm.config import FederationConfig, load_config  # noqa: E402
from fedglm.server.robust import trim_count  # noqa: E402
from fedglm.server.submit import ControlClient  # noqa: E402
from fedglm.simulate import local_stack  # noqa: E402

BASELINE = "mean"
RULES = (BASELINE, "trimmed-mean", "median")


def federation_for(base: FederationConfig, rule: str, seed: int, trim_fraction: float) -> FederationConfig:
    """The benchmark federation with one aggregation rule and seed; everything else as `base`."""
    update: dict[str, Any] = {"seed": seed, "aggregation": rule}
    if rule == "trimmed-mean":
        update["trim_fraction"] = trim_fraction
    return base.model_copy(update=update)


def adjust(base: FederationConfig, rounds: int | None, uplink: str | None) -> FederationConfig:
    """`base` with --rounds and --uplink applied (validated again by the config model)."""
    data = base.model_dump()
    if rounds is not None:
        data["rounds"] = rounds
    if uplink is not None:
        data["compression"]["uplink"]["codec"] = uplink
    return FederationConfig.model_validate(data)


def summarize(runs: dict[str, list[list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Final validation loss per rule (mean over seeds), its ratio and relative difference to the
    baseline's."""
    final = {rule: statistics.fmean(rows[-1]["val_loss"] for rows in seeds) for rule, seeds in runs.items()}
    reference = final[BASELINE]
    return [
        {
            "rule": rule,
            "val_loss": loss,
            "spread": _spread([rows[-1]["val_loss"] for rows in runs[rule]]),
            "ratio": loss / reference,
            "diff": (loss - reference) / reference,
        }
        for rule, loss in final.items()
    ]


def _spread(values: list[float]) -> str:
    """The standard deviation over seeds, or "-" with one seed."""
    return f"{statistics.stdev(values):.4f}" if len(values) > 1 else "-"


def print_curves(runs: dict[str, list[list[dict[str, Any]]]], labels: dict[str, str]) -> None:
    rounds = min(len(rows) for seeds in runs.values() for rows in seeds)
    print(f"{'round':>5s} " + " ".join(f"{labels[rule]:>17s}" for rule in runs))
    first = next(iter(runs.values()))[0]
    for i in range(rounds):  # round 0: the sites' evaluation of the base
        losses = [statistics.fmean(rows[i]["val_loss"] for rows in seeds) for seeds in runs.values()]
        print(f"{first[i]['round']:5d} " + " ".join(f"{loss:17.4f}" for loss in losses))


def print_summary(runs: dict[str, list[list[dict[str, Any]]]], labels: dict[str, str]) -> None:
    print(f"{'rule':17s} {'val loss':>9s} {'sd':>7s} {'x mean':>7s} {'vs mean':>8s}")
    for row in summarize(runs):
        print(
            f"{labels[row['rule']]:17s} {row['val_loss']:9.4f} {row['spread']:>7s} "
            f"{row['ratio']:7.3f} {row['diff']:+8.2%}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, required=True, help="MTSamples CSV (e.g. ../shared/data/mtsamples.csv)"
    )
    parser.add_argument("--config", type=Path, default=ROOT / "bench" / "federated.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-robust")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (each runs every rule)")
    parser.add_argument("--rounds", type=int, help="override the config's rounds (fewer: a quicker run)")
    parser.add_argument("--uplink", choices=list(CODECS), help="override the config's uplink codec")
    parser.add_argument("--base", type=Path, help="a base folder (default: random weights, <out>/base)")
    parser.add_argument(
        "--only", nargs="*", choices=RULES[1:], help=f"run these robust rules ({BASELINE} always runs)"
    )
    parser.add_argument(
        "--trim-fraction",
        type=float,
        default=0.25,
        help="trimmed-mean's fraction dropped at each end (0.25 of 4 sites: one each end)",
    )
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    out = args.out.absolute()
    folder = bench_base(out, args.base)
    base = adjust(load_config(args.config, FederationConfig), args.rounds, args.uplink)
    base = base.model_copy(update={"base": folder})
    sites = make_sites(args.data, out, base=folder)
    trimmed = trim_count(len(sites), args.trim_fraction)
    labels = {rule: rule for rule in RULES}
    labels["trimmed-mean"] = f"trimmed-mean@{args.trim_fraction:g}"
    if trimmed == 0:
        print(f"note: --trim-fraction {args.trim_fraction:g} trims nothing among {len(sites)} sites")
    fab = fab_bytes()
    rules = [BASELINE, *[r for r in RULES[1:] if not args.only or r in args.only]]
    runs: dict[str, list[list[dict[str, Any]]]] = {rule: [] for rule in rules}
    with local_stack(sites, out, on_status=print) as stack:
        client = ControlClient(stack.address, stack.ca_cert)
        try:
            for seed in range(args.seeds):
                for rule in rules:
                    federation = federation_for(base, rule, seed, args.trim_fraction)
                    started = time.perf_counter()
                    rows = run_once(client, fab, federation, out / "runs" / f"{rule}-seed{seed}")
                    runs[rule].append(rows)
                    print(
                        f"  seed {seed} {labels[rule]:17s} val_loss {rows[-1]['val_loss']:.4f} "
                        f"({time.perf_counter() - started:.0f} s)",
                        flush=True,
                    )
        finally:
            client.close()
    up = base.compression.uplink
    uplink = f"{up.codec}@{up.density:g}" if CODECS[up.codec].sparse else up.codec
    trimming = f"trimmed-mean drops {trimmed} of {len(sites)} at each end; " if "trimmed-mean" in runs else ""
    print(
        f"\n{len(sites)} hospitals (clean: no hostile site), {base.rounds} rounds, "
        f"base {describe_base(folder)}, {base.train.local_steps} local {base.train.optimizer} steps, "
        f"uplink {uplink}; {trimming}means over {args.seeds} seed(s)\n"
    )
    print("validation loss after each round")
    print_curves(runs, labels)
    print(f"\nfinal validation loss against {BASELINE}")
    print_summary(runs, labels)


if __name__ == "__main__":
    main()
