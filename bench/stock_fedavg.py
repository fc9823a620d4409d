"""The baseline of the benchmarks: Flower's own FedAvg driving fedglm's ClientApp, dense fp32.

It reads the same run spec as fedglm's ServerApp (base folder, local training, rounds) and runs
`flwr.serverapp.strategy.FedAvg(...).start(...)` as a Flower user would write it: the initial
arrays are the base folder's model (with the run's LoRA adapters when `train.adapters` is
`lora`), every tensor sent dense fp32 both ways; the round config announces the base's hash,
which every site checks against its own copy of the folder. The grid is
wrapped to count the bytes of every message pushed and pulled (serialized records, as fedglm
counts its own), and a `metrics.jsonl` with fedglm's keys is written into the run folder.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from flwr.app import ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedglm import metrics
from fedglm.atomic import atomic_write_text
from fedglm.layout import DONE_NAME
from fedglm.models.base import open_run_base
from fedglm.payload import CONFIG_KEY, state_record, wire_bytes
from fedglm.protocol import RoundConfig
from fedglm.server.app import read_spec

app = ServerApp()


class CountingGrid:
    """A Grid that counts the bytes of each round: messages sent down, replies up."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.down: dict[int, int] = defaultdict(int)
        self.up: dict[int, int] = defaultdict(int)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        rnd = RoundConfig.from_record(messages[0].content.config_records[CONFIG_KEY]).server_round or 0
        self.down[rnd] += sum(wire_bytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.up[rnd] += sum(wire_bytes(r.content) for r in replies if not r.has_error())
        return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    spec = read_spec(context)
    fed = spec.federation
    base = open_run_base(fed.base, fed.train.seq_len)
    model = base.build(lora=fed.train.lora_spec(fed.model.init_seed, base.family))
    strategy = FedAvg(
        fraction_train=fed.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=fed.min_clients,
        min_evaluate_nodes=fed.min_clients,
        min_available_nodes=fed.min_clients,
        weighted_by_key="weight",
    )
    # Flower's FedAvg adds `server-round` to this config itself.
    config = RoundConfig(
        model=fed.model, train=fed.train, seed=fed.seed, rounds=fed.rounds, base_hash=base.hash
    ).to_record()
    counting = CountingGrid(grid)
    result = strategy.start(
        grid=counting,
        initial_arrays=state_record(model),
        num_rounds=fed.rounds,
        timeout=fed.round_timeout_s,
        train_config=config,
        evaluate_config=ConfigRecord(dict(config)),
    )
    for rnd in range(1, fed.rounds + 1):
        train = result.train_metrics_clientapp.get(rnd, {})
        evaluation = result.evaluate_metrics_clientapp.get(rnd, {})
        row: dict[str, Any] = {
            "round": rnd,
            "train_loss": train.get("train_loss"),
            "val_loss": evaluation.get("val_loss"),
            "val_bpb": evaluation.get("val_bpb"),
            "upload_bytes": counting.up[rnd],
            "download_bytes": counting.down[rnd],
            "dense_upload_bytes": counting.up[rnd],
            "dense_download_bytes": counting.down[rnd],
            "clients": fed.min_clients,
            "epsilon_max": None,
            "seconds": None,
        }
        metrics.append_round(spec.out_dir, row)
    atomic_write_text(spec.out_dir / DONE_NAME, f"{fed.rounds}\n")
