"""The federated round loop: train, aggregate, evaluate, measure, then hand the round over.

A readable function rather than `Strategy.start`, because fedglm needs what `start` does not
give: rounds that resume from a checkpoint, bytes measured on the messages actually sent and
received, a node that lost its copy of the model sent the full model within the same round,
and a hook that persists each round (checkpoint first, then the metrics line) before the next
begins.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any, Protocol

from flwr.app import Message
from flwr.common import log
from flwr.serverapp import Grid

from fedglm.errors import CheckFailed
from fedglm.payload import ARRAYS_KEY, STALE_MODEL, wire_bytes
from fedglm.server.strategy import EvalOutcome, TrainOutcome

REPLY_POLL_S = 0.2


class RoundStrategy(Protocol):
    """fedglm's own strategy protocol (not Flower's `Strategy`): typed settings out, typed
    outcomes back (`strategy.FedglmAvg`)."""

    def train_messages(self, server_round: int, grid: Grid) -> list[Message]: ...

    def train_outcome(self, server_round: int, replies: list[Message]) -> TrainOutcome: ...

    def evaluate_messages(self, server_round: int, grid: Grid) -> list[Message]: ...

    def evaluate_outcome(self, server_round: int, replies: list[Message]) -> EvalOutcome: ...

    def full_model(self, message: Message) -> Message: ...


@dataclass
class Traffic:
    """Bytes of one round, both directions, as sent; and what dense fp32 tensors would weigh.

    `dense_model_bytes`: the model as dense fp32 values. A message's dense equivalent is its
    size with its `arrays` record replaced by that many bytes (evaluation replies carry no
    arrays and count as they are).
    """

    dense_model_bytes: int
    upload_bytes: int = 0
    download_bytes: int = 0
    dense_upload_bytes: int = 0
    dense_download_bytes: int = 0

    def _dense(self, content: Any, size: int) -> int:
        arrays = content.array_records.get(ARRAYS_KEY)
        return size if arrays is None else size - wire_bytes(arrays) + self.dense_model_bytes

    def exchange(
        self, grid: Grid, messages: list[Message], timeout: float, resend: Callable[[Message], Message]
    ) -> list[Message]:
        """Send `messages`, wait for the replies, and count both directions.

        A node that answers `stale-model` (it cannot build the round's model from what it
        holds) is sent `resend(message)`, the full model, once.
        """
        replies = self._send(grid, messages, timeout)
        by_node = {m.metadata.dst_node_id: m for m in messages}
        stale = [r for r in replies if r.has_error() and STALE_MODEL in r.error.reason]
        if stale:
            log(INFO, "%d node(s) need the full model", len(stale))
            again = [resend(by_node[r.metadata.src_node_id]) for r in stale]
            replies = [r for r in replies if r not in stale] + self._send(grid, again, timeout)
        return replies

    def _send(self, grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
        sizes: dict[int, tuple[int, int]] = {}  # messages to several clients share one content object
        for message in messages:
            key = id(message.content)
            if key not in sizes:
                size = wire_bytes(message.content)
                sizes[key] = (size, self._dense(message.content, size))
            self.download_bytes += sizes[key][0]
            self.dense_download_bytes += sizes[key][1]
        replies = send_and_receive(grid, messages, timeout)
        for reply in replies:
            if reply.has_error():
                continue
            size = wire_bytes(reply.content)
            self.upload_bytes += size
            self.dense_upload_bytes += self._dense(reply.content, size)
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


RoundHook = Callable[[int, dict[str, Any]], bool]  # persists a round's row; True: stop the run


def run_rounds(
    grid: Grid,
    strategy: RoundStrategy,
    *,
    first_round: int,
    last_round: int,
    dense_model_bytes: int,
    timeout: float,
    on_round: RoundHook,
) -> int:
    """Run rounds `first_round..last_round`; `on_round` persists each finished round's row, and
    ends the run after that round when it answers True (`server/selection.py`).

    A fresh run first evaluates the base model at the sites, as every round is evaluated, and
    hands that over as round 0 (no training, no privacy spent). The run ends early, after the
    last finished round, when too few sites have privacy budget left to train (all selected
    sites declined, or fewer than `min_clients` remain). Returns the last finished round.
    """
    if first_round == 1:
        start = time.perf_counter()
        traffic = Traffic(dense_model_bytes)
        replies = traffic.exchange(grid, strategy.evaluate_messages(0, grid), timeout, strategy.full_model)
        evaluated = strategy.evaluate_outcome(0, replies)
        if on_round(0, round_row(0, TrainOutcome.nothing(), evaluated, traffic, time.perf_counter() - start)):
            return 0
    for server_round in range(first_round, last_round + 1):
        log(INFO, "[ROUND %d/%d]", server_round, last_round)
        start = time.perf_counter()
        traffic = Traffic(dense_model_bytes)

        started = time.perf_counter()
        messages = strategy.train_messages(server_round, grid)
        if not messages:
            log(WARNING, "round %d: too few sites have privacy budget left; the run ends here", server_round)
            return server_round - 1
        replies = traffic.exchange(grid, messages, timeout, strategy.full_model)
        log(INFO, "round %d: training exchange %.1f s", server_round, time.perf_counter() - started)
        trained = strategy.train_outcome(server_round, replies)
        if trained.declined and not trained.clients and not trained.rejections:
            log(
                WARNING,
                "round %d: every selected site declined (budget spent); the run ends here",
                server_round,
            )
            return server_round - 1
        if not trained.clients:
            raise CheckFailed(
                f"round {server_round}: no valid training reply from {len(messages)} client(s)"
                + (f" (rejected: {trained.rejections})" if trained.rejections else "")
                + "; see the client logs"
            )

        started = time.perf_counter()
        messages = strategy.evaluate_messages(server_round, grid)
        eval_replies = traffic.exchange(grid, messages, timeout, strategy.full_model)
        evaluated = strategy.evaluate_outcome(server_round, eval_replies)
        log(INFO, "round %d: evaluation exchange %.1f s", server_round, time.perf_counter() - started)
        row = round_row(server_round, trained, evaluated, traffic, time.perf_counter() - start)
        if on_round(server_round, row) and server_round < last_round:
            log(
                INFO,
                "round %d: no better round for `selection.patience` rounds; the run ends here",
                server_round,
            )
            return server_round
    return last_round


def round_row(
    server_round: int, trained: TrainOutcome, evaluated: EvalOutcome, traffic: Traffic, seconds: float
) -> dict[str, Any]:
    """The round's line in `metrics.jsonl` (keys in `metrics.REQUIRED_KEYS`)."""
    epsilon = evaluated.epsilon or trained.epsilon  # metric releases after training count too
    return {
        "round": server_round,
        "train_loss": trained.train_loss,
        "val_loss": evaluated.val_loss,
        "val_bpb": evaluated.val_bpb,
        "record_val_loss": evaluated.record_val_loss,
        "record_val_bpb": evaluated.record_val_bpb,
        **(evaluated.dp.row() if evaluated.dp is not None else {}),
        "upload_bytes": traffic.upload_bytes,
        "download_bytes": traffic.download_bytes,
        "dense_upload_bytes": traffic.dense_upload_bytes,
        "dense_download_bytes": traffic.dense_download_bytes,
        "clients": trained.clients,
        "rejected_updates": sum(trained.rejections.values()),
        "rejections": trained.rejections,
        "declined": trained.declined,
        "clipped_updates": trained.clipped,
        "update_norm_bound": trained.norm_bound,
        "epsilon_max": max(epsilon.values()) if epsilon else None,
        "seconds": round(seconds, 3),
        "epsilon": epsilon,
    }
