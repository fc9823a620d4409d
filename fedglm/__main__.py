"""`python -m fedglm` is the `fedglm` command."""

from fedglm.cli.main import app

app()
