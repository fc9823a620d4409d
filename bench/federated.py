"""Upload and download bytes against model quality: stock Flower FedAvg against fedglm's codecs.

    python bench/federated.py --data ../shared/data/mtsamples.csv [--seeds 3] [--rounds N]
                              [--only fp16 topk-10%] [--base FOLDER] [--out runs/bench-federated]

The model: a base folder of the Hugging Face GLM-4 `tiny` preset with random weights (init
seed 0) and a byte-level BPE tokenizer of 2,000 tokens trained on 3,000 generated public notes
(what `fedglm pretrain` trains its tokenizer on), written to `<out>/base/` (`random_base`), or
`--base`, any base folder (e.g. one `fedglm pretrain` made). MTSamples is partitioned into 4
hospitals by medical specialty (as `fedglm partition` does); every site holds the base folder.
One real SuperLink and 4 SuperNodes (TLS, loopback) then run, for each seed, the same rounds,
base, local training and seed (bench/federated.yaml) through:
- `stock`: Flower's `FedAvg.start` with dense fp32 ArrayRecords (bench/stock_fedavg.py);
- fedglm with `fp16` both ways, `topk` at several uplink densities, and `ternary`.
Bytes are the serialized message records both ways (fedglm's metrics.jsonl, with its round 0,
where the sites evaluate the base they built from the INIT message; a counting grid for the
stock run, whose first round sends the whole base). Printed: totals, final validation loss,
upload and download ratios to stock, relative loss difference to stock (means over seeds);
saved: a PNG of validation loss against cumulative upload bytes, and every run's metrics
under --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

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
    RunSpec,
    ShareConfig,
    SiteSpec,
    UplinkConfig,
    load_config,
)
from fedglm.corpus import generate_public_records  # noqa: E402
from fedglm.data import SiteData, load_records, split_records  # noqa: E402
from fedglm.flower import build_fab  # noqa: E402
from fedglm.layout import DONE_NAME, SERVERAPP_LOG, SPEC_KEY, SPEC_NAME  # noqa: E402
from fedglm.models.base import BaseModel  # noqa: E402
from fedglm.models.folder import save_folder  # noqa: E402
from fedglm.models.presets import PresetName, build_glm4, glm4_config  # noqa: E402
from fedglm.models.tokenizer import train_tokenizer  # noqa: E402
from fedglm.partition import partition_corpus  # noqa: E402
from fedglm.server.coordinator import write_spec  # noqa: E402
from fedglm.server.submit import ControlClient  # noqa: E402
from fedglm.simulate import local_stack  # noqa: E402


def _config(up_codec: str, up_density: float, down_codec: str, down_density: float) -> CompressionConfig:
    # warmup_density at most density: no warm-up (as with warmup_rounds 0), and it sidesteps
    # UplinkConfig.density_for(0) dividing by warmup_rounds = 0 when density < warmup_density
    # (the round-0 evaluation asks for it: a run with an uplink density under 0.1 fails).
    warmup = min(up_density, UplinkConfig().warmup_density)
    return CompressionConfig(
        uplink=UplinkConfig(codec=up_codec, density=up_density, warmup_density=warmup),
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


PRESET: PresetName = "tiny"
VOCAB = 2000  # `fedglm pretrain`'s default vocabulary
PUBLIC_NOTES = 3000  # `fedglm pretrain`'s default count of generated public notes
BASE_SETTINGS = "bench-base.json"  # beside the random base: the settings it was made with


def public_tokenizer(vocab_size: int = VOCAB, records: int = PUBLIC_NOTES) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on generated public notes (no site's records)."""
    return train_tokenizer(generate_public_records(records, 0), vocab_size)


def random_base(
    folder: Path, tokenizer: PreTrainedTokenizerFast, preset: PresetName = PRESET, seed: int = 0
) -> Path:
    """A GLM-4 base folder of `preset` with random weights (seeded) and `tokenizer`."""
    config = glm4_config(
        preset,
        vocab_size=len(tokenizer),
        bos_token_id=int(tokenizer.bos_token_id),
        eos_token_id=int(tokenizer.eos_token_id),
    )
    save_folder(build_glm4(config, seed), tokenizer, folder)
    return folder


def describe_base(folder: Path) -> str:
    base = BaseModel.open(folder)
    s = base.shape
    return (
        f"{base.family.architecture} {base.parameters:,} parameters ({s.layers} layers, hidden {s.hidden}, "
        f"{s.heads} heads / {s.kv_heads} KV, vocab {base.config.vocab_size})"
    )


def make_sites(
    data: Path, out: Path, privacy: PrivacyConfig | None = None, base: Path | None = None
) -> list[SiteSpec]:
    """MTSamples split into 4 hospitals by specialty, each holding the `base` folder; without
    DP unless `privacy` says so."""
    parts = partition_corpus(
        data, text_field="transcription", label_field="medical_specialty", sites=4, out_dir=out / "data"
    )
    return [
        SiteSpec(
            name=f"hospital-{i}",
            data=DataConfig(path=part.path, format="jsonl", field="text"),
            # MTSamples is public: losses and counts may be shared.
            share=ShareConfig(loss=True, record_count=True),
            privacy=privacy or PrivacyConfig(enabled=False),
            state_dir=out / "sites" / f"hospital-{i}" / "state",
            base=base,
        )
        for i, part in enumerate(parts, start=1)
    ]


def site_split(site: SiteSpec) -> SiteData:
    """A site's training and validation texts, split as its ClientApp splits them."""
    texts = load_records(site.data.path, site.data.format, site.data.field)
    return split_records(texts, site.data.val_fraction, site.data.split_seed)


def run_once(
    client: ControlClient, fab: bytes, federation: FederationConfig, run_dir: Path, *, reuse: bool = False
) -> list[dict[str, Any]]:
    """Run `federation` into `run_dir` (or, with `reuse`, take a finished run of it from there)."""
    if reuse and (rows := finished_rows(run_dir, federation)) is not None:
        print(f"  (reused {run_dir})")
        return rows
    shutil.rmtree(run_dir, ignore_errors=True)
    spec = write_spec(run_dir, federation, resume=False)
    run_id = client.start_run(fab, {SPEC_KEY: str(spec)})
    logs = client.stream_logs(run_id, run_dir / SERVERAPP_LOG)
    while (status := client.status(run_id))[0] != "finished":
        time.sleep(0.5)
    logs.join(timeout=5.0)
    if status[1] != "completed":
        raise SystemExit(
            f"{run_dir.name}: run {run_id} {status[1]}: {status[2]} "
            f"(see {run_dir / SERVERAPP_LOG} and the SuperNode logs under {run_dir.parent.parent / 'flower'})"
        )
    return metrics.read_rows(run_dir)


def summarize(runs: dict[str, list[list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Totals over every row (fedglm's round 0 included: its traffic is real) and the final
    row's validation loss and bits per byte, means over seeds, with ratios to stock."""

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
                "val_bpb": mean(name, lambda rows: rows[-1]["val_bpb"]),
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
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("4 MTSamples hospitals: validation loss against upload bytes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def with_rounds(federation: FederationConfig, rounds: int | None) -> FederationConfig:
    """`federation` with --rounds applied (validated again by the config model)."""
    if rounds is None:
        return federation
    return FederationConfig.model_validate({**federation.model_dump(), "rounds": rounds})


def bench_base(out: Path, given: Path | None) -> Path:
    """The base every run starts from: `given`, or the random-weights `tiny` base in `<out>/base`
    (made once with these settings, then reused, so its hash stays that of earlier runs)."""
    if given is not None:
        return given.absolute()
    folder = out / "base"
    settings = json.dumps({"preset": PRESET, "vocab": VOCAB, "public_notes": PUBLIC_NOTES, "seed": 0})
    mark = folder / BASE_SETTINGS
    if mark.is_file() and mark.read_text(encoding="utf-8") == settings:
        return folder
    random_base(folder, public_tokenizer())
    mark.write_text(settings, encoding="utf-8")  # not a hashed file: the folder's hash is unchanged
    return folder


def finished_rows(run_dir: Path, federation: FederationConfig) -> list[dict[str, Any]] | None:
    """The metrics of a finished run of the same federation in `run_dir` (`--reuse`), else None."""
    spec = run_dir / SPEC_NAME
    if not (run_dir / DONE_NAME).is_file() or not spec.is_file():
        return None
    if RunSpec.model_validate_json(spec.read_text(encoding="utf-8")).federation != federation:
        return None
    return metrics.read_rows(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, required=True, help="MTSamples CSV (e.g. ../shared/data/mtsamples.csv)"
    )
    parser.add_argument("--config", type=Path, default=ROOT / "bench" / "federated.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-federated")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, help="override the config's rounds (fewer: a quicker run)")
    parser.add_argument("--base", type=Path, help="a base folder (default: random weights, <out>/base)")
    parser.add_argument(
        "--only", nargs="*", choices=list(CONFIGS), help="run these configurations (stock always runs)"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="take runs of the same federation that finished in --out"
    )
    args = parser.parse_args()
    out = args.out.absolute()
    folder = bench_base(out, args.base)
    base = with_rounds(load_config(args.config, FederationConfig), args.rounds)
    base = base.model_copy(update={"base": folder})
    names = ["stock", *[n for n in CONFIGS if n != "stock" and (not args.only or n in args.only)]]
    sites = make_sites(args.data, out, base=folder)
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
                        reuse=args.reuse,
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
        f"\n{len(sites)} hospitals, {base.rounds} rounds, base {describe_base(folder)}, "
        f"{base.train.adapters} fine-tuning, {base.train.local_steps} local {base.train.optimizer} steps; "
        f"means over {args.seeds} seed(s)"
    )
    print(
        f"{'config':11s} {'upload B':>12s} {'download B':>12s} {'val loss':>9s} {'bits/B':>7s} "
        f"{'up x':>8s} {'down x':>8s} {'loss diff':>9s}"
    )
    for row in summarize(runs):
        print(
            f"{row['config']:11s} {row['upload']:12,.0f} {row['download']:12,.0f} {row['val_loss']:9.4f} "
            f"{row['val_bpb']:7.4f} {row['up_ratio']:8.1f} {row['down_ratio']:8.1f} {row['loss_diff']:+9.2%}"
        )
    plot(runs, out / "loss-vs-upload.png")
    print(f"\nplot: {out / 'loss-vs-upload.png'}")


if __name__ == "__main__":
    main()
