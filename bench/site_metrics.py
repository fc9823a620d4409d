"""The sites' validation loss released under DP, against the exact loss, on MedQuAD by source.

    python bench/site_metrics.py --data ../shared/data/medquad.jsonl
                                 [--public ../shared/data/mtsamples.csv:transcription]
                                 [--rounds 3] [--out runs/bench-site-metrics]

MedQuAD's answers are split by `source` into 4 hospitals (`fedglm partition`), each keeping
its record count private (q = 0.02 is declared instead) with an epsilon 8 budget, and two
`fedglm simulate` runs go side by side on the same base (the `tiny` GLM-4 pretrained 150 steps
on generated notes, LoRA, 3 rounds):
- `private`: the sites keep their losses private, as a hospital's config does by default;
  the coordinator sees only the losses released under DP (`dp_val_loss`) and its own score on
  public text (`public_val_loss`, here MTSamples transcriptions);
- `public`: the same with `share.loss: true`, so the exact losses of the very models the DP
  estimates describe are known too (`record_val_loss`, the mean over each site's records as
  the DP release estimates it, and the token-weighted `val_loss`).
Printed: round by round, the DP estimate and its stated noise, the exact values and the
public score; then each site's epsilon, the epsilon of its training updates alone
(dp-accounting PLD over the ledger), and the training noise multiplier against the one
calibrated without metric releases.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedglm import metrics  # noqa: E402
from fedglm.layout import DONE_NAME  # noqa: E402
from fedglm.partition import partition_corpus  # noqa: E402
from fedglm.privacy.accounting import calibrate_sigma  # noqa: E402
from fedglm.privacy.audit import dp_accounting_epsilon  # noqa: E402
from fedglm.privacy.ledger import parse_ledger, split_releases  # noqa: E402
from fedglm.privacy.site import LEDGER_FILE, history, privacy_dir  # noqa: E402

SITES = 4
Q = 0.02


def config(sites: list[Path], *, rounds: int, share_loss: bool, base: Path | None, public: str) -> str:
    path, _, column = public.partition(":")
    public_data = {"path": str(Path(path).resolve()), "field": column or "text"}
    site_entries = [
        {
            "name": f"hospital-{i}",
            "data": {"path": str(site.resolve()), "field": "text"},
            "share": {"loss": share_loss, "record_count": False},
            "privacy": {"epsilon": 8.0, "sample_rate": Q},
        }
        for i, site in enumerate(sites, start=1)
    ]
    federation: dict[str, Any] = {
        "rounds": rounds,
        "min_clients": SITES,
        "train": {"adapters": "lora", "lr": 1e-2, "local_steps": 20, "batch_size": 16, "seq_len": 128},
        "public_eval": {"text": {"data": public_data}, "max_records": 200},
    }
    cfg: dict[str, Any] = {"federation": federation, "sites": site_entries, "release": None}
    if base is not None:
        federation["base"] = str(base.resolve())
        cfg["pretrain"] = None
    else:
        cfg["pretrain"] = {"steps": 150}
    return json.dumps(cfg, indent=1)  # JSON is YAML


def simulate(out: Path, text: str) -> list[dict[str, Any]]:
    """The rows of a `fedglm simulate` run of config `text` (a finished run in `out` is kept)."""
    if (out / DONE_NAME).exists():
        print(f"{out}: finished before, kept")
        return metrics.read_rows(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(text)
    command = [sys.executable, "-m", "fedglm", "simulate", "--config", str(path), "--out", str(out)]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return metrics.read_rows(out)


def num(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def ledgers(out: Path) -> list[tuple[str, list[Any]]]:
    found = []
    for state in sorted((out / "sites").glob("*/state")):
        lines, _ = parse_ledger((privacy_dir(state) / LEDGER_FILE).read_text())
        found.append((state.parent.name, lines))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="medquad.jsonl")
    parser.add_argument("--public", default=str(ROOT.parent / "shared/data/mtsamples.csv") + ":transcription")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-site-metrics"))
    args = parser.parse_args()
    parts = partition_corpus(
        args.data, text_field="answer", label_field="source", sites=SITES, out_dir=args.out / "data"
    )
    for part in parts:
        print(f"{part.path.name}: {part.records} records ({', '.join(part.labels)})")
    sites = [part.path for part in parts]
    private = simulate(
        args.out / "private",
        config(sites, rounds=args.rounds, share_loss=False, base=None, public=args.public),
    )
    public = simulate(
        args.out / "public",
        config(
            sites,
            rounds=args.rounds,
            share_loss=True,
            base=args.out / "private/base/model",
            public=args.public,
        ),
    )

    print(
        "\nround | private: DP val loss +- noise | public: DP val loss +- noise | exact per-record mean "
        "| exact token-weighted | public text (private run)"
    )
    for a, b in zip(private, public, strict=True):
        print(
            f"{a['round']:5d} | {num(a.get('dp_val_loss'))} +- {num(a.get('dp_val_noise'))} | "
            f"{num(b.get('dp_val_loss'))} +- {num(b.get('dp_val_noise'))} | "
            f"{num(b.get('record_val_loss'))} | "
            f"{num(b.get('val_loss'))} | {num(a.get('public_val_loss'))}"
        )
    errors = [b["dp_val_loss"] - b["record_val_loss"] for b in public if b.get("dp_val_loss") is not None]
    if errors:
        print(f"public run, DP - exact per round: {', '.join(f'{e:+.3f}' for e in errors)}")

    print("\nsite | epsilon | updates alone (PLD) | metric releases | sigma | sigma without metrics")
    for name, lines in ledgers(args.out / "private"):
        updates, metric_lines = split_releases(lines)
        delta = float(lines[-1].entry["delta"])
        last = updates[-1].entry
        plain = calibrate_sigma(
            target_epsilon=float(last["budget"]),
            delta=delta,
            q=float(last["q"]),
            steps=int(last["steps"]) * args.rounds,
            accountant="prv",
        )
        print(
            f"{name} | {float(lines[-1].entry['epsilon']):.4f} | "
            f"{dp_accounting_epsilon(history(updates), delta, 'pld'):.4f} | {len(metric_lines)} | "
            f"{float(last['sigma']):.4f} | {plain:.4f} ({100 * (float(last['sigma']) / plain - 1):+.1f}%)"
        )


if __name__ == "__main__":
    main()
