"""The federated round loop: train, aggregate, evaluate, measure, then hand the round over.

A readable function rather than `Strategy.start`, because fedglm needs what `start` does not
give: rounds that resume from a checkpoint, bytes measured on the messages actually sent and
received, and a hook that persists each round (checkpoint first, then the metrics line) before
the next begins.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any, Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid

from fedglm.errors import CheckFailed
from fedglm.payload import ARRAYS_KEY, dense_array_bytes, wire_bytes

REPLY_POLL_S = 0.2


class Strategy(Protocol):
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Any: ...

    def aggregate_train(
        self, server_round: int, replies: Any
    ) -> tuple[ArrayRecord | None, MetricRecord | None]: ...

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Any: ...

    def aggregate_evaluate(self, server_round: int, replies: Any) -> MetricRecord | None: ...


@dataclass
class Traffic:
    upload_bytes: int = 0
    download_bytes: int = 0
    dense_upload_bytes: int = 0

    def exchange(self, grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
        """Send `messages`, wait for the replies, and count both directions."""
        sizes: dict[int, int] = {}  # messages to several clients share one content object
        for message in messages:
            key = id(message.content)
            if key not in sizes:
                sizes[key] = wire_bytes(message.content)
            self.download_bytes += sizes[key]
        replies = send_and_receive(grid, messages, timeout)
        for reply in replies:
            if reply.has_error():
                continue
            sent = wire_bytes(reply.content)
            self.upload_bytes += sent
            arrays = reply.content.array_records.get(ARRAYS_KEY)
            if arrays is None:
                self.dense_upload_bytes += sent
            else:
                self.dense_upload_bytes += sent - wire_bytes(arrays) + dense_array_bytes(arrays)
        return replies


def send_and_receive(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """Push `messages` and collect the replies, polling every 0.2 s (Flower's polls every 3 s)."""
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending and time.monotonic() < deadline:
        arrived = list(grid.pull_messages(pending))
        replies.extend(arrived)
        pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
        if pending:
            time.sleep(REPLY_POLL_S)
    if pending:
        log(
            WARNING,
            "%d of %d client(s) did not reply within %.0f s",
            len(pending),
            len(messages),
            timeout,
        )
    return replies


RoundHook = Callable[[int, ArrayRecord, dict[str, Any]], None]


def run_rounds(
    grid: Grid,
    strategy: Strategy,
    *,
    arrays: ArrayRecord,
    first_round: int,
    last_round: int,
    train_config: ConfigRecord,
    timeout: float,
    on_round: RoundHook,
) -> ArrayRecord:
    """Run rounds `first_round..last_round`; `on_round` persists each finished round."""
    for server_round in range(first_round, last_round + 1):
        log(INFO, "[ROUND %d/%d]", server_round, last_round)
        start = time.perf_counter()
        traffic = Traffic()

        started = time.perf_counter()
        messages = list(
            strategy.configure_train(server_round, arrays, ConfigRecord(dict(train_config)), grid)
        )
        replies = traffic.exchange(grid, messages, timeout)
        log(INFO, "round %d: training exchange %.1f s", server_round, time.perf_counter() - started)
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is None or train_metrics is None:
            raise CheckFailed(
                f"round {server_round}: no valid training reply from {len(messages)} client(s); "
                "see the client logs"
            )
        arrays = new_arrays

        started = time.perf_counter()
        messages = list(
            strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(train_config)), grid)
        )
        eval_metrics = strategy.aggregate_evaluate(server_round, traffic.exchange(grid, messages, timeout))
        log(
            INFO,
            "round %d: evaluation exchange %.1f s",
            server_round,
            time.perf_counter() - started,
        )
        eval_metrics = eval_metrics or MetricRecord()

        row: dict[str, Any] = {
            "round": server_round,
            "train_loss": train_metrics.get("train_loss"),
            "val_loss": eval_metrics.get("val_loss"),
            "val_bpb": eval_metrics.get("val_bpb"),
            "upload_bytes": traffic.upload_bytes,
            "download_bytes": traffic.download_bytes,
            "dense_upload_bytes": traffic.dense_upload_bytes,
            "clients": int(train_metrics.get("clients", 0)),
            "epsilon_max": None,
            "seconds": round(time.perf_counter() - start, 3),
        }
        on_round(server_round, arrays, row)
    return arrays
