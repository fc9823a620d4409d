"""fedglm's aggregation strategy: FedAvg that checks every reply before it touches the model.

It speaks Flower's four strategy verbs (`configure_train`, `aggregate_train`,
`configure_evaluate`, `aggregate_evaluate`) so the round loop, or Flower's own `Strategy.start`,
can drive it. What it adds to stock FedAvg:
- every reply is validated against the model's expected names, shapes and dtype, and must be
  finite; a bad reply is dropped with a log line, never averaged in;
- weights are uniform by default, because a site's record count is private; a coordinator may
  ask for record-count weights, used only in a round where every replying site declared its
  count public;
- accumulation is in fp32 tensors, one reply at a time (no stacked copies of all replies).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Literal

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType, log
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedglm.payload import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, PayloadError, read_state

Weighting = Literal["uniform", "records"]


class FedglmAvg:
    """Federated averaging of validated replies; see the module docstring."""

    def __init__(
        self,
        *,
        expected: Mapping[str, tuple[int, ...]],
        min_clients: int,
        fraction_train: float = 1.0,
        weighting: Weighting = "uniform",
    ) -> None:
        self.expected = dict(expected)
        self.min_clients = min_clients
        self.fraction_train = fraction_train
        self.weighting = weighting

    def summary(self) -> None:
        log(
            INFO,
            "FedglmAvg: min_clients=%d fraction_train=%.2f weighting=%s",
            self.min_clients,
            self.fraction_train,
            self.weighting,
        )

    def _messages(
        self, grid: Grid, arrays: ArrayRecord, config: ConfigRecord, fraction: float, kind: str
    ) -> list[Message]:
        available = len(list(grid.get_node_ids()))
        sample_size = max(int(available * fraction), self.min_clients)
        node_ids, _ = sample_nodes(grid, self.min_clients, sample_size)
        content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})
        return [Message(content=content, message_type=kind, dst_node_id=n) for n in node_ids]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config["server-round"] = server_round
        return self._messages(grid, arrays, config, self.fraction_train, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config["server-round"] = server_round
        return self._messages(grid, arrays, config, 1.0, MessageType.EVALUATE)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted: list[tuple[dict[str, torch.Tensor], MetricRecord]] = []
        for reply in _successful(replies, server_round):
            try:
                state = read_state(reply.content, self.expected)
            except PayloadError as exc:
                log(
                    WARNING,
                    "round %d: dropped reply from node %d: %s",
                    server_round,
                    reply.metadata.src_node_id,
                    exc,
                )
                continue
            accepted.append((state, reply.content.metric_records.get(METRICS_KEY, MetricRecord())))
        if not accepted:
            return None, None
        weights = self._weights([metrics for _, metrics in accepted], server_round)
        total = sum(weights)
        average = {name: torch.zeros(shape, dtype=torch.float32) for name, shape in self.expected.items()}
        for (state, _), weight in zip(accepted, weights, strict=True):
            for name, tensor in state.items():
                average[name].add_(tensor, alpha=weight / total)
        metrics = _mean_metrics([m for _, m in accepted], ("train_loss",))
        metrics["clients"] = len(accepted)
        return ArrayRecord(average), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        records = [
            reply.content.metric_records.get(METRICS_KEY, MetricRecord())
            for reply in _successful(replies, server_round)
        ]
        if not records:
            return None
        metrics = _mean_metrics(records, ("val_loss", "val_bpb"))
        metrics["clients"] = len(records)
        return metrics

    def _weights(self, metrics: list[MetricRecord], server_round: int) -> list[float]:
        if self.weighting == "uniform":
            return [1.0] * len(metrics)
        if not all(m.get("records-public") == 1 for m in metrics):
            log(
                WARNING,
                "round %d: a site did not declare its record count public; averaging uniformly this round",
                server_round,
            )
            return [1.0] * len(metrics)
        counts = [float(m.get("weight", 0.0)) for m in metrics]
        if any(c <= 0 for c in counts):
            log(
                WARNING,
                "round %d: a record count is not positive; averaging uniformly",
                server_round,
            )
            return [1.0] * len(metrics)
        return counts


def _successful(replies: Iterable[Message], server_round: int) -> list[Message]:
    good = []
    for reply in replies:
        if reply.has_error():
            log(
                WARNING,
                "round %d: node %d replied with an error: %s",
                server_round,
                reply.metadata.src_node_id,
                reply.error.reason,
            )
        else:
            good.append(reply)
    return good


def _mean_metrics(records: list[MetricRecord], keys: tuple[str, ...]) -> MetricRecord:
    """Uniform mean of each key over the records that report a finite value for it."""
    out = MetricRecord()
    for key in keys:
        values = [float(r[key]) for r in records if key in r and math.isfinite(float(r[key]))]
        if values:
            out[key] = sum(values) / len(values)
    return out
