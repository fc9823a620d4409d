"""`fedglm generate` on what `fedglm export` wrote: the KV-cache graph (else the logits graph) and the
served model's tokenizer, greedy as torch decodes the served model, sampled reproducibly; a folder
without an export is one line and exit 2. The release comes from tests/test_release.py (once per
session: distillation and two ONNX exports)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedglm.cli.main import app
from fedglm.generate import generate
from fedglm.layout import ONNX_FILES, RELEASE_DIR, SERVED_DIR
from fedglm.models.causal import forward_logits
from fedglm.models.folder import load_model, load_tokenizer
from tests.test_release import released_run

PROMPT = "Patient reports chest pain"


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return released_run(tmp_path_factory.getbasetemp())


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["generate", *args])
    return result.exit_code, result.stdout, result.stderr


@torch.no_grad()
def torch_greedy(folder: Path, prompt: str, steps: int) -> str:
    """The served model's greedy continuation in torch, up to eos or `steps` tokens."""
    model, tokenizer = load_model(folder).eval(), load_tokenizer(folder)
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]])
    new: list[int] = []
    for _ in range(steps):
        token = int(forward_logits(model, ids)[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    text: str = tokenizer.decode(new, skip_special_tokens=True)
    return text


def test_greedy_generation_from_the_release_is_the_served_models(released: Path, tmp_path: Path) -> None:
    expected = PROMPT + torch_greedy(released / RELEASE_DIR / SERVED_DIR, PROMPT, 12)
    # a release folder with the logits graph only: the whole sequence again per token, same text
    logits_only = tmp_path / "release"
    shutil.copytree(released / RELEASE_DIR, logits_only, ignore=shutil.ignore_patterns(ONNX_FILES["cache"]))

    for where in (released, released / RELEASE_DIR, logits_only):
        code, out, err = invoke(str(where), "--prompt", PROMPT, "--max-new-tokens", "12")
        assert code == 0, err
        assert out == expected + "\n"


def test_sampling_options_reach_the_generator(released: Path) -> None:
    options = ["--prompt", PROMPT, "--max-new-tokens", "10", "--temperature", "1.0", "--top-k", "20"]
    folder = released / RELEASE_DIR
    expected = generate(
        folder / ONNX_FILES["cache"],
        load_tokenizer(folder / SERVED_DIR),
        PROMPT,
        max_new_tokens=10,
        temperature=1.0,
        top_k=20,
        seed=3,
    )

    first = invoke(str(released), *options, "--seed", "3")
    again = invoke(str(released), *options, "--seed", "3")

    assert first == again and first[0] == 0
    assert first[1] == PROMPT + expected + "\n"


def test_a_folder_without_an_export_or_a_tokenizer_is_one_line_and_exit_2(
    released: Path, tmp_path: Path
) -> None:
    code, out, err = invoke(str(tmp_path), "--prompt", PROMPT)
    assert code == 2 and out == ""
    assert err.strip() == (
        f"fedglm: error: {tmp_path}: no exported model (model.kv.onnx or model.onnx); run fedglm export first"
    )
    shutil.copy(released / RELEASE_DIR / ONNX_FILES["cache"], tmp_path / ONNX_FILES["cache"])
    code, _, err = invoke(str(tmp_path), "--prompt", PROMPT)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{tmp_path}: no model/ folder with the served model's tokenizer" in err
    code, _, err = invoke(str(released), "--prompt", PROMPT, "--temperature", "-1")
    assert code == 2 and "temperature" in err
