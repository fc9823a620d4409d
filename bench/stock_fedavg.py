"""The baseline for bench/round_overhead.py: Flower's own FedAvg driving the same ClientApp.

It reads the same run spec as fedglm's ServerApp (model, local training, rounds) and runs
`flwr.serverapp.strategy.FedAvg(...).start(...)` as a Flower user would write it.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedglm.model import build_model
from fedglm.payload import round_config, state_record
from fedglm.server.app import read_spec

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    fed = read_spec(context).federation
    model = build_model(fed.model.glm_args(), fed.model.init_seed)
    strategy = FedAvg(
        fraction_train=fed.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=fed.min_clients,
        min_evaluate_nodes=fed.min_clients,
        min_available_nodes=fed.min_clients,
        weighted_by_key="weight",
    )
    config = round_config(fed.model.model_dump(), fed.train.model_dump(), fed.seed)
    strategy.start(
        grid=grid,
        initial_arrays=state_record(model),
        num_rounds=fed.rounds,
        timeout=fed.round_timeout_s,
        train_config=ConfigRecord(config),
        evaluate_config=ConfigRecord(config),
    )
