"""The fedglm ClientApp: Flower's handlers, run inside `flwr-clientapp` at a hospital.

Thin on purpose: each handler reads the site's spec (`site.py`) and hands the message to the
round at the site (`round.py`), which does the work and builds the reply.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedglm.clients.round import evaluate_round, train_round
from fedglm.clients.site import read_site

app = ClientApp()


@app.train()
def train(message: Message, context: Context) -> Message:
    return train_round(read_site(context), message)


@app.evaluate()
def evaluate_global(message: Message, context: Context) -> Message:
    return evaluate_round(read_site(context), message)
