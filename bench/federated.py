"""Upload and download bytes against model quality: stock Flower FedAvg against fedglm's codecs.

    python bench/federated.py --data ../shared/data/mtsamples.csv [--seeds 3] [--out runs/bench-federated]

MTSamples is partitioned into 4 hospitals by medical specialty (as `fedglm partition` does).
One real SuperLink and 4 SuperNodes (TLS, loopback) then run, for each seed, the same rounds,
model, local training and seed (bench/federated.yaml) through:
- `stock`: Flower's `FedAvg.start` with dense fp32 ArrayRecords (bench/stock_fedavg.py);
- fedglm with `fp16` both ways, `topk` at several uplink densities, and `ternary`.
Bytes are the serialized message records both ways (fedglm's metrics.jsonl; a counting grid
for the stock run). Printed: totals, final validation loss, upload and download ratios to
stock, relative loss difference to stock (means over seeds); saved: a PNG of validation loss
against cumulative upload bytes, and every run's metrics under --out.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedglm import metrics  # noqa: E402
from fedglm.app_bundle import fab_bytes  # noqa: E402
from fedglm.config import (  # noqa: E402
    CompressionConfig,
    DataConfig,
    FederationConfig,
    LinkConfig,
    PrivacyConfig,
    ShareConfig,
    SiteSpec,
    UplinkConfig,
    load_config,
)
from fedglm.data import encode, load_records, split_records  # noqa: E402
from fedglm.flower import build_fab  # noqa: E402
from fedglm.layout import SPEC_KEY  # noqa: E402
from fedglm.partition import partition_csv  # noqa: E402
from fedglm.server.coordinator import write_spec  # noqa: E402
from fedglm.server.submit import ControlClient  # noqa: E402
from fedglm.simulate import local_stack  # noqa: E402


def _config(up_codec: str, up_density: float, down_codec: str, down_density: float) -> CompressionConfig:
    return CompressionConfig(
        uplink=UplinkConfig(codec=up_codec, density=up_density),
        downlink=LinkConfig(codec=down_codec, density=down_density),
    )


CONFIGS: dict[str, CompressionConfig | None] = {
    "stock": None,
    "fp16": _config("fp16", 1.0, "fp16", 1.0),
    "topk-10%": _config("topk", 0.1, "topk", 0.3),
    "topk-3%": _config("topk", 0.03, "topk", 0.1),
    "topk-1%": _config("topk", 0.01, "topk", 0.04),
    "ternary-10%": _config("ternary", 0.1, "topk", 0.3),
}


def make_sites(data: Path, out: Path, privacy: PrivacyConfig | None = None) -> list[SiteSpec]:
    """MTSamples split into 4 hospitals by specialty; without DP unless `privacy` says so."""
    parts = partition_csv(
        data, text_column="transcription", label_column="medical_specialty", sites=4, out_dir=out / "data"
    )
    return [
        SiteSpec(
            name=f"hospital-{i}",
            data=DataConfig(path=part.path, format="jsonl", field="text"),
            # MTSamples is public: losses and counts may be shared.
            share=ShareConfig(loss=True, record_count=True),
            privacy=privacy or PrivacyConfig(enabled=False),
            state_dir=out / "sites" / f"hospital-{i}" / "state",
        )
        for i, part in enumerate(parts, start=1)
    ]


def site_records(site: SiteSpec) -> tuple[list[list[int]], list[list[int]]]:
    """A site's training and validation records, encoded, split as its ClientApp splits them."""
    texts = load_records(site.data.path, site.data.format, site.data.field)
    split = split_records(texts, site.data.val_fraction, site.data.split_seed)
    return [encode(t) for t in split.train], [encode(t) for t in split.val]


def run_once(
    client: ControlClient, fab: bytes, federation: FederationConfig, run_dir: Path
) -> list[dict[str, Any]]:
    shutil.rmtree(run_dir, ignore_errors=True)
    spec = write_spec(run_dir, federation, resume=False)
    run_id = client.start_run(fab, {SPEC_KEY: str(spec)})
    while (status := client.status(run_id))[0] != "finished":
        time.sleep(0.5)
    if status[1] != "completed":
        raise SystemExit(
            f"{run_dir.name}: run {run_id} {status[1]}: {status[2]} "
            f"(see the SuperNode logs under {run_dir.parent})"
        )
    return metrics.read_rows(run_dir)


def summarize(runs: dict[str, list[list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    def mean(name: str, f: Any) -> float:
        return statistics.fmean(f(rows) for rows in runs[name])

    stock_up = mean("stock", lambda rows: sum(r["upload_bytes"] for r in rows))
    stock_down = mean("stock", lambda rows: sum(r["download_bytes"] for r in rows))
    stock_loss = mean("stock", lambda rows: rows[-1]["val_loss"])
    table = []
    for name in runs:
        up = mean(name, lambda rows: sum(r["upload_bytes"] for r in rows))
        down = mean(name, lambda rows: sum(r["download_bytes"] for r in rows))
        loss = mean(name, lambda rows: rows[-1]["val_loss"])
        table.append(
            {
                "config": name,
                "upload": up,
                "download": down,
                "val_loss": loss,
                "up_ratio": stock_up / up,
                "down_ratio": stock_down / down,
                "loss_diff": (loss - stock_loss) / stock_loss,
            }
        )
    return table


def plot(runs: dict[str, list[list[dict[str, Any]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, seeds in runs.items():
        rounds = len(seeds[0])
        cumulative = [
            statistics.fmean(sum(r["upload_bytes"] for r in rows[: i + 1]) for rows in seeds)
            for i in range(rounds)
        ]
        loss = [statistics.fmean(rows[i]["val_loss"] for rows in seeds) for i in range(rounds)]
        ax.plot(cumulative, loss, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative upload bytes, all clients")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("4 MTSamples hospitals: validation loss against upload bytes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, required=True, help="MTSamples CSV (e.g. ../shared/data/mtsamples.csv)"
    )
    parser.add_argument("--config", type=Path, default=ROOT / "bench" / "federated.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-federated")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--only", nargs="*", choices=list(CONFIGS), help="run these configurations (stock always runs)"
    )
    args = parser.parse_args()
    out = args.out.absolute()
    base = load_config(args.config, FederationConfig)
    names = ["stock", *[n for n in CONFIGS if n != "stock" and (not args.only or n in args.only)]]
    sites = make_sites(args.data, out)
    stock_fab, fedglm_fab = build_fab(ROOT / "bench" / "stock_app"), fab_bytes()
    allowed = [hashlib.sha256(f).hexdigest() for f in (fedglm_fab, stock_fab)]
    runs: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in names}
    with local_stack(
        sites, out, on_status=print, allowed_apps=allowed, extra_pythonpath=[ROOT / "bench"]
    ) as stack:
        client = ControlClient(stack.address, stack.ca_cert)
        try:
            for seed in range(args.seeds):
                for name in names:
                    compression = CONFIGS[name]
                    update: dict[str, Any] = {"seed": seed}
                    if compression is not None:
                        update["compression"] = compression
                    federation = base.model_copy(update=update)
                    started = time.perf_counter()
                    rows = run_once(
                        client,
                        stock_fab if compression is None else fedglm_fab,
                        federation,
                        out / "runs" / f"{name}-seed{seed}",
                    )
                    runs[name].append(rows)
                    print(
                        f"  seed {seed} {name:11s} val_loss {rows[-1]['val_loss']:.4f}  "
                        f"up {sum(r['upload_bytes'] for r in rows):>11,d} B  "
                        f"down {sum(r['download_bytes'] for r in rows):>11,d} B  "
                        f"({time.perf_counter() - started:.0f} s)",
                        flush=True,
                    )
        finally:
            client.close()
    print(
        f"\n{len(sites)} hospitals, {base.rounds} rounds, model {base.model.preset}, "
        f"{base.train.local_steps} local {base.train.optimizer} steps; means over {args.seeds} seed(s)"
    )
    print(
        f"{'config':11s} {'upload B':>12s} {'download B':>12s} {'val loss':>9s} "
        f"{'up x':>8s} {'down x':>8s} {'loss diff':>9s}"
    )
    for row in summarize(runs):
        print(
            f"{row['config']:11s} {row['upload']:12,.0f} {row['download']:12,.0f} {row['val_loss']:9.4f} "
            f"{row['up_ratio']:8.1f} {row['down_ratio']:8.1f} {row['loss_diff']:+9.2%}"
        )
    plot(runs, out / "loss-vs-upload.png")
    print(f"\nplot: {out / 'loss-vs-upload.png'}")


if __name__ == "__main__":
    main()
