"""An app bundle that is NOT fedglm's: its ClientApp leaves a marker file if it ever runs.

Used by tests/clients/test_guard_integration.py to check that a site refuses it.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import MessageType
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    marker = str(context.run_config["marker"])
    nodes: list[int] = []
    while not nodes:
        nodes = list(grid.get_node_ids())
    content = RecordDict({"config": ConfigRecord({"marker": marker})})
    messages = [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n) for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=120))
    outcome = "; ".join(r.error.reason if r.has_error() else "ran" for r in replies)
    Path(marker + ".server").write_text(outcome or "no reply")


@client.train()
def train(message: Message, context: Context) -> Message:
    Path(str(message.content.config_records["config"]["marker"])).write_text("rogue code ran")
    return Message(content=RecordDict({"metrics": MetricRecord({"x": 1.0})}), reply_to=message)
