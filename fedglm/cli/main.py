"""The `fedglm` command: one typer app, one module per command."""

from __future__ import annotations

import typer

from fedglm.cli import audit, certs, client, generate, keys, partition, pretrain, release, server, simulate

app = typer.Typer(
    name="fedglm",
    help="Federated, differentially private fine-tuning of Hugging Face language models (GLM-4 first).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("simulate")(simulate.simulate)
app.command("server")(server.server)
app.command("pretrain")(pretrain.pretrain_command)
app.command("client")(client.client)
app.command("certs")(certs.certs)
app.command("partition")(partition.partition)
app.command("keys")(keys.keys)
app.command("audit")(audit.audit)
app.command("distill")(release.distill)
app.command("export")(release.export)
app.command("generate")(generate.generate_command)
