"""`fedglm generate`: try the released model: text from its ONNX export, in ONNX Runtime only.

RELEASE is a run's `release/` folder (or the run folder holding it): the KV-cache graph
`model.kv.onnx` is used when present (else `model.onnx`, the whole sequence again per token),
with the tokenizer of the served model's folder `release/model/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedglm.cli.common import reports_errors
from fedglm.errors import InputError
from fedglm.generate import generate
from fedglm.layout import ONNX_FILES, RELEASE_DIR, SERVED_DIR
from fedglm.models.folder import load_tokenizer


def release_files(release: Path) -> tuple[Path, Path]:
    """(the ONNX graph to run, the folder of its tokenizer) of a release or run folder."""
    folder = release / RELEASE_DIR if (release / RELEASE_DIR).is_dir() else release
    for name in (ONNX_FILES["cache"], ONNX_FILES["fp32"]):
        if (folder / name).is_file():
            if not (folder / SERVED_DIR).is_dir():
                raise InputError(f"{folder}: no {SERVED_DIR}/ folder with the served model's tokenizer")
            return folder / name, folder / SERVED_DIR
    raise InputError(
        f"{release}: no exported model ({ONNX_FILES['cache']} or {ONNX_FILES['fp32']}); "
        "run fedglm export first"
    )


@reports_errors
def generate_command(
    release: Annotated[Path, typer.Argument(help="A run's release/ folder, or the run folder.")],
    prompt: Annotated[str, typer.Option(help="The text to continue.")],
    max_new_tokens: Annotated[int, typer.Option(min=1, max=4096, help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy; above 0: sampled.")] = 0.0,
    top_k: Annotated[int | None, typer.Option(min=1, help="Sample among the k likeliest tokens.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sampling.")] = 0,
) -> None:
    """Generate text from a released model (ONNX Runtime; greedy or sampled)."""
    graph, tokenizer_folder = release_files(release)
    text = generate(
        graph,
        load_tokenizer(tokenizer_folder),
        prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
    )
    typer.echo(prompt + text)
