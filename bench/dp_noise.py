"""How much lower DP-SGD's noise would have to be: bench/base_model.py's federation from the
public base, with the noise multiplier scaled down, against the same run without DP.

    python bench/dp_noise.py --data ../shared/data/mtsamples.csv \
        [--base runs/bench-base/base/model] [--scales 1 0.5 0.25 0.1 0] [--epsilon 8] [--seeds 1]
        [--rounds N]

An analysis, not a private run: below scale 1 the noise spends more than the budget, so no
ledger is kept and nothing leaves the process. It separates the two things DP-SGD does to the
update, so the gap to the run without DP can be attributed:
- scale 1: the sites' own noise multiplier (calibrated as a site calibrates it: epsilon, delta
  1e-5, PRV, q = batch / training records, every step of the run);
- scale s: s times that noise, same clipping;
- scale 0: clipping to the clip norm with no noise at all;
- `no DP`: the ClientApp's non-private training.
Everything else is the federation's own code run in one process: the sites of
bench/base_model.py (`make_sites`, their training / validation split, tokenised with the base's
tokenizer), the base folder `bench/base_model.py` pretrained (run it first; any base folder with
`--base`), bench/base_model.yaml's rounds, local steps, batch and learning rate
(`--lr`), the ClientApp's training functions (`train_private`, `train_local`) with a fresh
AdamW each round, the uplink's top-k with error feedback (`encode_tensors`), uniform averaging,
and the coordinator's downlink (`Broadcast.advance`). Printed: final validation loss (mean over
the sites, as the federation's evaluation reports it) per point, and its change against no DP.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from federated import make_sites, site_split, with_rounds  # noqa: E402  (bench/federated.py, beside this script)

from fedglm.compression import CODECS  # noqa: E402
from fedglm.compression.update import encode_tensors  # noqa: E402
from fedglm.config import FederationConfig, PrivacyConfig, TrainConfig, load_config  # noqa: E402
from fedglm.data import sample_batches, text_bytes  # noqa: E402
from fedglm.models.base import BaseModel  # noqa: E402
from fedglm.models.lora import load_wire_state, wire_state  # noqa: E402
from fedglm.models.tokenizer import encode_records  # noqa: E402
from fedglm.privacy.accounting import calibrate_sigma  # noqa: E402
from fedglm.privacy.dpsgd import dp_precision, train_private  # noqa: E402
from fedglm.server.broadcast import Broadcast  # noqa: E402
from fedglm.training import (  # noqa: E402
    held_out,
    make_optimizer,
    private_steps_for,
    resolve_precision,
    steps_for,
    train_local,
)

DEVICE = torch.device("cpu")
Site = tuple[list[list[int]], list[list[int]], int]  # training records, validation records, their bytes


def site_update(
    model: torch.nn.Module,
    train: list[list[int]],
    cfg: TrainConfig,
    sigma: float | None,
    privacy: PrivacyConfig,
    seed: int,
) -> None:
    """One site's local round on `model` (in place), as the ClientApp's `train` runs it."""
    optimizer = make_optimizer(
        model, name=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    precision = resolve_precision(cfg.precision, DEVICE)
    if sigma is None:
        batches = sample_batches(
            train,
            batch_size=cfg.batch_size,
            seq_len=cfg.seq_len,
            generator=torch.Generator().manual_seed(seed),
        )
        train_local(
            model,
            batches,
            optimizer=optimizer,
            steps=steps_for(cfg.local_steps, cfg.local_epochs, len(train), cfg.batch_size),
            precision=precision,
            grad_clip=cfg.grad_clip,
            device=DEVICE,
        )
        return
    q = cfg.batch_size / len(train)
    train_private(
        model,
        train,
        optimizer=optimizer,
        q=q,
        sigma=sigma,
        clip_norm=privacy.clip_norm,
        steps=private_steps_for(cfg.local_steps, cfg.local_epochs, q),
        seq_len=cfg.seq_len,
        precision=dp_precision(cfg.precision, precision, privacy.mode),
        mode=privacy.mode,
        device=DEVICE,
        expected_batch_size=float(cfg.batch_size),  # q x records, public in this bench
        sampling=torch.Generator().manual_seed(seed),
        noise=torch.Generator().manual_seed(seed + 1),
    )


def site_sigma(privacy: PrivacyConfig, fed: FederationConfig, n_train: int) -> float:
    """The noise multiplier a site calibrates: its whole budget over every step of the run."""
    q = fed.train.batch_size / n_train
    steps = fed.rounds * private_steps_for(fed.train.local_steps, fed.train.local_epochs, q)
    return calibrate_sigma(
        target_epsilon=privacy.epsilon, delta=privacy.delta, q=q, steps=steps, accountant=privacy.accountant
    )


def federation(
    base: torch.nn.Module,
    sites: list[Site],
    fed: FederationConfig,
    privacy: PrivacyConfig,
    sigmas: list[float] | None,
    seed: int,
) -> float:
    """Final validation loss of one run with each site's noise multiplier; `sigmas` None: without DP."""
    cfg, up, down = fed.train, fed.compression.uplink, fed.compression.downlink
    broadcast = Broadcast(wire_state(base))
    names = broadcast.trainable
    shapes = broadcast.update_shapes
    residuals = [{name: np.zeros(int(np.prod(shapes[name])), np.float32) for name in names} for _ in sites]
    noise: list[float | None] = [None] * len(sites) if sigmas is None else list(sigmas)
    losses: list[float] = []
    for server_round in range(1, fed.rounds + 1):
        total = {name: np.zeros(int(np.prod(shapes[name])), np.float32) for name in names}
        for index, ((train, _, _), sigma) in enumerate(zip(sites, noise, strict=True)):
            model = copy.deepcopy(base)
            load_wire_state(model, broadcast.state)
            site_update(model, train, cfg, sigma, privacy, seed=seed * 10_000 + server_round * 100 + index)
            trained = wire_state(model)
            values = {
                name: (trained[name].float() - broadcast.state[name]).reshape(-1).numpy()
                + residuals[index][name]
                for name in names
            }
            _, sent = encode_tensors(
                values, shapes, CODECS[up.codec], density=up.density, selection=up.selection
            )
            residuals[index] = values  # what was not sent (encode_tensors leaves it in place)
            for name, change in sent.items():
                change.add_to(total[name], 1.0 / len(sites))
        broadcast.advance(
            total, server_round, codec=CODECS[down.codec], density=down.density, selection=down.selection
        )
        model = copy.deepcopy(base)
        load_wire_state(model, broadcast.state)
        losses = [held_out(model, val, cfg.seq_len, n_bytes).loss for _, val, n_bytes in sites]
    return statistics.fmean(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="MTSamples CSV")
    parser.add_argument("--base", type=Path, default=ROOT / "runs" / "bench-base" / "base" / "model")
    parser.add_argument("--config", type=Path, default=ROOT / "bench" / "base_model.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-dp-noise")
    parser.add_argument("--lr", type=float, default=2e-3, help="full fine-tuning's learning rate")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1, 0.0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--rounds", type=int, help="override the config's rounds (fewer: a quicker run)")
    args = parser.parse_args()
    if not args.base.is_dir():
        raise SystemExit(
            f"--base {args.base}: no such folder; run bench/base_model.py first (it pretrains the base)"
        )
    fed = with_rounds(load_config(args.config, FederationConfig), args.rounds)
    fed = fed.model_copy(update={"train": fed.train.model_copy(update={"lr": args.lr})})
    opened = BaseModel.open(args.base)
    base, tokenizer = opened.build(lora=None), opened.tokenizer()
    privacy = PrivacyConfig(epsilon=args.epsilon, delta=1e-5)
    sites: list[Site] = []
    for site in make_sites(args.data, args.out):
        split = site_split(site)
        sites.append(
            (
                encode_records(tokenizer, split.train),
                encode_records(tokenizer, split.val),
                text_bytes(split.val),
            )
        )
    calibrated = [site_sigma(privacy, fed, len(train)) for train, _, _ in sites]
    points: list[tuple[str, float | None]] = [("no DP", None)] + [(f"x{s:g}", s) for s in args.scales]
    results: dict[str, list[float]] = {}
    for label, scale in points:
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            started = time.perf_counter()
            sigmas = None if scale is None else [scale * sigma for sigma in calibrated]
            loss = federation(base, sites, fed, privacy, sigmas, seed)
            results.setdefault(label, []).append(loss)
            print(
                f"  noise {label:6s} seed {seed}: val_loss {loss:.4f} "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    plain = statistics.fmean(results["no DP"])
    print(
        f"\n4 hospitals, {fed.rounds} rounds x {fed.train.local_steps} local steps, "
        f"batch {fed.train.batch_size}, lr {fed.train.lr:g}, epsilon {args.epsilon:g} at scale 1; "
        f"means over {args.seeds} seed(s)"
    )
    print(f"{'noise':8s} {'val loss':>9s} {'vs no DP':>9s}")
    for label, losses in results.items():
        loss = statistics.fmean(losses)
        print(f"{label:8s} {loss:9.4f} {loss / plain - 1:+9.2%}")


if __name__ == "__main__":
    main()
