"""The fedglm ClientApp: Flower's handlers, run inside `flwr-clientapp` at a hospital.

Thin on purpose: each handler reads the site's spec (`site.py`), brings the message's model
up to date (`round.receive`) and hands it to the round at the site, with DP
(`private_round.py`) or without (`round.py`), which does the work and builds the reply.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedglm.clients.evaluation import evaluate_round
from fedglm.clients.private_round import train_with_dp
from fedglm.clients.round import receive, train_without_dp
from fedglm.clients.site import read_site

app = ClientApp()


@app.train()
def train(message: Message, context: Context) -> Message:
    site = read_site(context)
    received = receive(site, message)
    if site.privacy.enabled:
        return train_with_dp(received, message)
    return train_without_dp(received, message)


@app.evaluate()
def evaluate_global(message: Message, context: Context) -> Message:
    return evaluate_round(read_site(context), message)
