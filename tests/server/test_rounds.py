from typing import Any, cast

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedglm import metrics
from fedglm.payload import STALE_MODEL
from fedglm.server.rounds import RoundStrategy, Traffic, run_rounds
from fedglm.server.strategy import EvalOutcome, TrainOutcome


class FakeGrid:
    """Answers every pushed message at once: nodes in `stale` fail the first time."""

    def __init__(self, stale: set[int]) -> None:
        self.stale = set(stale)
        self.pushed: list[Any] = []
        self.waiting: dict[str, Any] = {}

    def push_messages(self, messages: list[Any]) -> list[str]:
        ids = []
        for i, message in enumerate(messages):
            mid = f"m{len(self.pushed) + i}"
            self.waiting[mid] = message
            ids.append(mid)
        self.pushed.extend(messages)
        return ids

    def pull_messages(self, ids: Any) -> list["FakeReply"]:
        replies = []
        for mid in list(ids):
            node = self.waiting.pop(mid).metadata.dst_node_id
            if node in self.stale:
                self.stale.discard(node)
                replies.append(
                    FakeReply(node, mid, error=f"<class 'StaleModel'>:<'{STALE_MODEL}: holds nothing'>")
                )
            else:
                replies.append(FakeReply(node, mid))
        return replies


class FakeReply:
    """A reply as the round loop reads it."""

    def __init__(self, node: int, reply_to: str, error: str | None = None) -> None:
        self.content = RecordDict({"metrics": MetricRecord({"val_loss": 1.0})})
        self.error = None if error is None else type("E", (), {"reason": error})()
        self.metadata = type("M", (), {"src_node_id": node, "reply_to_message_id": reply_to})()

    def has_error(self) -> bool:
        return self.error is not None


class FakeMessage:
    """A message as the round loop reads it (Flower's own needs a run context)."""

    def __init__(self, node: int, value: float) -> None:
        self.content = RecordDict({"metrics": MetricRecord({"x": value})})
        self.metadata = type("M", (), {"dst_node_id": node})()


def test_stale_nodes_get_the_resent_message_once() -> None:
    grid = FakeGrid(stale={2})
    resent: list[int] = []

    def full_model(message: FakeMessage) -> FakeMessage:
        resent.append(message.metadata.dst_node_id)
        return FakeMessage(message.metadata.dst_node_id, 2.0)

    traffic = Traffic(dense_model_bytes=1000)
    replies = traffic.exchange(grid, [FakeMessage(1, 1.0), FakeMessage(2, 1.0)], 5.0, full_model)
    assert resent == [2]
    assert len(replies) == 2 and not any(r.has_error() for r in replies)
    assert len(grid.pushed) == 3
    assert traffic.upload_bytes > 0 and traffic.download_bytes > 0


class FakeStrategy:
    """A strategy as the round loop calls it: every node trains and evaluates; calls recorded."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes
        self.calls: list[tuple[str, int]] = []

    def train_messages(self, server_round: int, grid: Any) -> list[FakeMessage]:
        self.calls.append(("train", server_round))
        return [FakeMessage(node, 1.0) for node in self.nodes]

    def train_outcome(self, server_round: int, replies: list[FakeReply]) -> TrainOutcome:
        return TrainOutcome(
            clients=len(replies),
            declined=0,
            rejections={},
            clipped=0,
            norm_bound=None,
            train_loss=3.0,
            epsilon={},
        )

    def evaluate_messages(self, server_round: int, grid: Any) -> list[FakeMessage]:
        self.calls.append(("evaluate", server_round))
        return [FakeMessage(node, 1.0) for node in self.nodes]

    def evaluate_outcome(self, server_round: int, replies: list[FakeReply]) -> EvalOutcome:
        return EvalOutcome(clients=len(replies), val_loss=2.0 - 0.5 * server_round, val_bpb=None)

    def full_model(self, message: FakeMessage) -> FakeMessage:
        self.calls.append(("full", message.metadata.dst_node_id))
        return FakeMessage(message.metadata.dst_node_id, 2.0)


def _rounds(
    first_round: int, last_round: int, stale: set[int] | None = None, stop_after: int | None = None
) -> tuple[FakeStrategy, list[Any]]:
    strategy = FakeStrategy([1, 2])
    rows: list[Any] = []

    def on_round(server_round: int, row: dict[str, Any]) -> bool:
        rows.append((server_round, row))
        return server_round == stop_after

    last = run_rounds(
        cast(Grid, FakeGrid(stale=stale or set())),
        cast(RoundStrategy, strategy),
        first_round=first_round,
        last_round=last_round,
        dense_model_bytes=1000,
        timeout=5.0,
        on_round=on_round,
    )
    assert last == (last_round if stop_after is None else stop_after)
    return strategy, rows


def test_the_round_hook_can_end_the_run_after_a_round() -> None:
    strategy, rows = _rounds(1, 4, stop_after=2)
    assert [server_round for server_round, _ in rows] == [0, 1, 2]
    assert ("train", 3) not in strategy.calls
    strategy, rows = _rounds(1, 4, stop_after=0)  # even before round 1 trains
    assert [server_round for server_round, _ in rows] == [0] and ("train", 1) not in strategy.calls


def test_a_fresh_run_evaluates_the_base_as_round_0_before_training() -> None:
    strategy, rows = _rounds(1, 2)
    assert strategy.calls == [("evaluate", 0), ("train", 1), ("evaluate", 1), ("train", 2), ("evaluate", 2)]
    assert [server_round for server_round, _ in rows] == [0, 1, 2]
    _, zero = rows[0]
    assert set(metrics.REQUIRED_KEYS) <= set(zero)
    assert zero["round"] == 0 and zero["val_loss"] == 2.0
    assert zero["train_loss"] is None and zero["clients"] == 0  # nothing trained, no privacy spent
    assert zero["epsilon"] == {} and zero["epsilon_max"] is None and zero["declined"] == 0
    assert zero["download_bytes"] > 0 and zero["upload_bytes"] > 0  # the evaluation's traffic counts
    assert [row["train_loss"] for _, row in rows[1:]] == [3.0, 3.0]


def test_round_0_resends_the_full_model_to_a_stale_node() -> None:
    strategy, rows = _rounds(1, 1, stale={2})
    assert strategy.calls[:2] == [("evaluate", 0), ("full", 2)]
    assert rows[0][1]["val_loss"] == 2.0


def test_a_resumed_run_does_not_evaluate_the_base_again() -> None:
    strategy, rows = _rounds(2, 3)
    assert ("evaluate", 0) not in strategy.calls
    assert [server_round for server_round, _ in rows] == [2, 3]
