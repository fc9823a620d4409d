from typing import Any

from flwr.app import MetricRecord, RecordDict

from fedglm.payload import STALE_MODEL
from fedglm.server.rounds import Traffic


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
