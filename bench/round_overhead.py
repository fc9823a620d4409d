"""Round overhead of fedglm against stock Flower, and local training throughput by precision.

    python bench/round_overhead.py [--repeats 2] [--steps 10] [--out runs/bench-round-overhead]

Models are Hugging Face GLM-4s with the byte-level BPE tokenizer bench/federated.py trains on
generated public notes; the base folder is bench/federated.py's `random_base` (the `tiny`
preset, random weights) in `<out>/base/`, which every site holds.
Part 1 starts ONE real SuperLink and two SuperNodes (TLS, loopback; bench/round_overhead.yaml)
and runs the same base, data and local steps alternately through Flower's own
`flwr.serverapp.strategy.FedAvg.start` (bench/stock_fedavg.py) and through fedglm's ServerApp.
Each run is timed from submission to completion; seconds per round = wall time / rounds. A
fresh fedglm run also evaluates the base at the sites first (its round 0, which stock FedAvg
does not run): its time (the server's `seconds` of that row) is printed apart and taken out of
fedglm's seconds per round.
Part 2 times local training steps of the `small` GLM-4 preset in fp32 and in the `auto`
precision, alternating, in this process. Absolute times drift on a shared machine: read the
ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from federated import public_tokenizer, random_base  # noqa: E402  (bench/federated.py, beside this script)

from fedglm import metrics  # noqa: E402
from fedglm.app_bundle import fab_bytes  # noqa: E402
from fedglm.config import SimulateConfig, load_config  # noqa: E402
from fedglm.corpus import generate_site_records  # noqa: E402
from fedglm.data import sample_batches  # noqa: E402
from fedglm.flower import build_fab  # noqa: E402
from fedglm.layout import SPEC_KEY  # noqa: E402
from fedglm.models.presets import build_glm4, glm4_config  # noqa: E402
from fedglm.models.tokenizer import encode_records  # noqa: E402
from fedglm.server.coordinator import write_spec  # noqa: E402
from fedglm.server.submit import ControlClient  # noqa: E402
from fedglm.simulate import local_stack, simulated_sites, with_base  # noqa: E402
from fedglm.training import make_optimizer, resolve_precision, train_local  # noqa: E402


def timed_run(client: ControlClient, fab: bytes, spec: Path) -> float:
    start = time.perf_counter()
    run_id = client.start_run(fab, {SPEC_KEY: str(spec)})
    while (status := client.status(run_id))[0] != "finished":
        time.sleep(0.2)
    if status[1] != "completed":
        raise SystemExit(f"run {run_id} {status[1]}: {status[2]}")
    return time.perf_counter() - start


def round_overhead(config: SimulateConfig, out: Path, repeats: int) -> None:
    stock_fab = build_fab(ROOT / "bench" / "stock_app")
    fedglm_fab = fab_bytes()
    allowed = [hashlib.sha256(f).hexdigest() for f in (fedglm_fab, stock_fab)]
    folder = random_base(out / "base", public_tokenizer())
    federation = config.federation.model_copy(update={"base": folder})
    sites = with_base(simulated_sites(config, out), folder)
    rounds = federation.rounds
    times: dict[str, list[float]] = {"stock": [], "fedglm": []}
    round0: list[float] = []
    with local_stack(
        sites, out, on_status=print, allowed_apps=allowed, extra_pythonpath=[ROOT / "bench"]
    ) as stack:
        client = ControlClient(stack.address, stack.ca_cert)
        try:
            for repeat in range(repeats):
                for name, fab in (("stock", stock_fab), ("fedglm", fedglm_fab)):
                    run_dir = out / f"{name}-{repeat}"
                    shutil.rmtree(run_dir, ignore_errors=True)
                    spec = write_spec(run_dir, federation, resume=False)
                    wall = timed_run(client, fab, spec)
                    first = [r["seconds"] for r in metrics.read_rows(run_dir) if r["round"] == 0]
                    if first:
                        round0.append(first[0])
                    seconds = (wall - sum(first)) / rounds
                    times[name].append(seconds)
                    extra = f" (+ round 0: {first[0]:.2f} s)" if first else ""
                    print(f"  repeat {repeat + 1} {name:7s} {seconds:6.2f} s/round{extra}")
        finally:
            client.close()
    stock, ours = statistics.median(times["stock"]), statistics.median(times["fedglm"])
    print(
        f"\nround overhead ({len(sites)} sites, {rounds} rounds, train + evaluate each round, "
        f"median of {repeats}):"
    )
    print(f"  stock Flower FedAvg  {stock:6.2f} s/round")
    print(f"  fedglm               {ours:6.2f} s/round")
    if round0:
        print(f"  fedglm round 0       {statistics.median(round0):6.2f} s (the base evaluated, once per run)")
    print(f"  ratio fedglm/stock   {ours / stock:6.3f}  (target <= 1.10)")


def throughput(steps: int, repeats: int) -> None:
    tokenizer = public_tokenizer()
    config = glm4_config(
        "small",
        vocab_size=len(tokenizer),
        bos_token_id=int(tokenizer.bos_token_id),
        eos_token_id=int(tokenizer.eos_token_id),
    )
    records = encode_records(tokenizer, generate_site_records(0, 200, 0))
    device = torch.device("cpu")
    auto = resolve_precision("auto", device)
    results: dict[str, list[float]] = {"fp32": [], auto: []}
    for _ in range(repeats):
        for precision in dict.fromkeys(("fp32", auto)):
            model = build_glm4(config, 0)
            optimizer = make_optimizer(model, name="adamw", lr=1e-3, momentum=0.9, weight_decay=0.0)
            batches = sample_batches(
                records, batch_size=16, seq_len=256, generator=torch.Generator().manual_seed(0)
            )
            train_local(
                model,
                batches,
                optimizer=optimizer,
                steps=2,
                precision=precision,  # warm-up
                grad_clip=1.0,
                device=device,
            )
            stats = train_local(
                model,
                batches,
                optimizer=optimizer,
                steps=steps,
                precision=precision,
                grad_clip=1.0,
                device=device,
            )
            results[precision].append(stats.tokens_per_second)
    fp32, best = statistics.median(results["fp32"]), statistics.median(results[auto])
    print(
        f"\nlocal training throughput (small GLM-4, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
        f"parameters, batch 16 x 256 tokens, {torch.get_num_threads()} threads, median of {repeats}):"
    )
    print(f"  fp32                 {fp32:8.0f} tokens/s")
    print(f"  auto ({auto})         {best:8.0f} tokens/s")
    print(f"  ratio auto/fp32      {best / fp32:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "bench" / "round_overhead.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-round-overhead")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per precision")
    args = parser.parse_args()
    round_overhead(load_config(args.config, SimulateConfig), args.out.absolute(), args.repeats)
    throughput(args.steps, args.repeats)


if __name__ == "__main__":
    main()
