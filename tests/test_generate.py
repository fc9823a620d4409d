"""Generation from the exported ONNX graphs in ONNX Runtime, against torch's greedy decoding."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from fedglm.generate import (
    CachedDecoder,
    FullDecoder,
    generate,
    generate_ids,
    load_decoder,
    pick,
    session,
    tokens_per_second,
)
from fedglm.models.causal import forward_logits
from tests.export.test_causal_onnx import (
    Exported,
    exported_glm4,
    tokenizer,
)

PROMPT = "Patient reports chest pain"


@pytest.fixture(scope="module")
def glm4(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return exported_glm4(tmp_path_factory.getbasetemp())


def prompt_ids() -> list[int]:
    tok = tokenizer()
    return [tok.bos_token_id, *tok.encode(PROMPT, add_special_tokens=False)]


@torch.no_grad()
def torch_greedy(model: torch.nn.Module, ids: list[int], steps: int) -> list[int]:
    tokens = torch.tensor([ids])
    for _ in range(steps):
        nxt = forward_logits(model, tokens)[0, -1].argmax()
        tokens = torch.cat([tokens, nxt.view(1, 1)], dim=1)
    return [int(t) for t in tokens[0, len(ids) :]]


def test_greedy_generation_from_onnx_equals_torch_greedy(glm4: Exported) -> None:
    ids = prompt_ids()
    expected = torch_greedy(glm4.model, ids, 40)
    cached = load_decoder(glm4.logits, glm4.cache)
    full = load_decoder(glm4.logits)
    eos = tokenizer().eos_token_id
    until_eos = expected[: expected.index(eos)] if eos in expected else expected

    with_cache = generate_ids(cached, ids, max_new_tokens=40)
    without = generate_ids(full, ids, max_new_tokens=40)
    text = generate([glm4.cache], tokenizer(), PROMPT, max_new_tokens=40)

    assert isinstance(cached, CachedDecoder) and isinstance(full, FullDecoder)
    assert with_cache == expected
    assert without == expected
    assert text == tokenizer().decode(until_eos, skip_special_tokens=True)


def test_sampling_is_reproducible_for_a_seed_and_differs_across_seeds(glm4: Exported) -> None:
    decoder = load_decoder(session(glm4.cache))

    def sample(seed: int, top_k: int | None = 50) -> str:
        return generate(
            decoder, tokenizer(), PROMPT, max_new_tokens=16, temperature=1.0, top_k=top_k, seed=seed
        )

    first, again, others = sample(1), sample(1), {sample(seed) for seed in (2, 3, 4)}
    greedy = generate(decoder, tokenizer(), PROMPT, max_new_tokens=16)

    assert first == again
    assert others - {first}
    assert sample(5, top_k=1) == greedy  # top-1 sampling is greedy


def test_generation_without_torch_in_a_fresh_process(glm4: Exported, tmp_path: Path) -> None:
    tokenizer().save_pretrained(tmp_path / "tokenizer")
    script = (
        "import sys\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "from fedglm.generate import generate\n"
        f"tok = PreTrainedTokenizerFast.from_pretrained({str(tmp_path / 'tokenizer')!r})\n"
        f"text = generate({str(glm4.cache)!r}, tok, {PROMPT!r}, max_new_tokens=12, temperature=0.8, seed=3)\n"
        "print('torch' in sys.modules)\n"
        "print(repr(text))\n"
    )

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    expected = generate(glm4.cache, tokenizer(), PROMPT, max_new_tokens=12, temperature=0.8, seed=3)

    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["False", repr(expected)]


class Scripted:
    """A decoder whose next-token logits favour a fixed script of tokens."""

    def __init__(self, script: Sequence[int], vocab: int = 10) -> None:
        self.script, self.vocab, self.step = list(script), vocab, 0
        self.seen: list[int] = []

    def start(self, ids: Sequence[int]) -> np.ndarray:
        self.step, self.seen = 0, list(ids)
        return self._logits()

    def advance(self, token: int) -> np.ndarray:
        self.step += 1
        self.seen.append(token)
        return self._logits()

    def _logits(self) -> np.ndarray:
        logits = np.zeros(self.vocab, np.float32)
        logits[self.script[self.step]] = 5.0
        return logits


def test_generation_stops_at_eos_and_at_the_token_limit() -> None:
    decoder = Scripted([4, 5, 6, 9, 7, 7])

    stopped = generate_ids(decoder, [0], max_new_tokens=10, eos_id=9)
    limited = generate_ids(decoder, [0], max_new_tokens=2, eos_id=9)
    nothing = generate_ids(decoder, [0], max_new_tokens=0, eos_id=9)

    assert stopped == [4, 5, 6]
    assert limited == [4, 5] and decoder.seen == [0, 4]  # the last token is not fed back
    assert nothing == []


def test_tokens_per_second_times_exactly_the_new_tokens() -> None:
    decoder = Scripted([3] * 8)

    speed = tokens_per_second(decoder, [0], new_tokens=6, repeats=2)

    assert speed > 0 and decoder.seen == [0, 3, 3, 3, 3, 3]


def test_pick_keeps_sampling_inside_the_top_k() -> None:
    logits = np.array([3.0, 2.9, 2.8, -1.0, -2.0])
    rng = np.random.default_rng(0)

    drawn = {pick(logits, temperature=2.0, top_k=3, rng=rng) for _ in range(300)}

    assert drawn == {0, 1, 2}
    assert pick(logits, temperature=0.0, top_k=None, rng=rng) == 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"max_new_tokens": 4, "temperature": -0.5}, "temperature"),
        ({"max_new_tokens": 4, "temperature": float("nan")}, "temperature"),
        ({"max_new_tokens": 4, "temperature": 1.0, "top_k": 0}, "top_k"),
    ],
)
def test_bad_arguments_name_the_value(arguments: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_ids(Scripted([1]), [0], **arguments)  # type: ignore[arg-type]
