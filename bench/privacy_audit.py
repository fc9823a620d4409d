"""Empirical privacy audit of one DP-SGD round at a site, from one training run (Steinke, Nasr
and Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023).

    python bench/privacy_audit.py [--data ../shared/data/mtsamples.csv] [--crafted]
                                  [--canaries 1000] [--epsilon 8] [--crafted-epsilon 1]

The model is the Hugging Face GLM-4 `tiny` preset with a byte-level BPE tokenizer trained on
generated public notes (bench/federated.py's `public_tokenizer`); records are token ids of that
tokenizer. The script needs `fedglm.models` (the Hugging Face path): it can no longer audit a
fedglm from before it (the table below was measured on the retired byte-level model, with an
older fedglm on PYTHONPATH).

A site (the first `--records` training records of `--data`, read and split as a ClientApp reads
them, or generated notes) gets m canaries, each added independently with probability 1/2 from
a seeded draw. The site then runs ONE round as its ClientApp does: the site's model check on
the received weights (where this fedglm has one), `train_private` (Poisson sampling, per-record
clipping, Gaussian noise from the site's secret generators, sigma calibrated by the accountant
for the target epsilon at delta), the model change encoded with the uplink codec (`topk`,
per-tensor, at the default uplink density) and decoded as the coordinator decodes it. The
coordinator, who knows the canaries and the model it sent, scores every canary from the
decoded update alone and guesses; `fedglm/privacy/canary.py` turns the guesses into a lower
bound on epsilon at 95% confidence (best of a fixed grid of guess counts, Bonferroni-corrected),
printed beside the ledger's epsilon for the round (the accountant's, for (sigma, q, steps) at
delta). A bound above the ledger's epsilon means the round leaks more than its ledger says.

Settings chosen to make the audit as tight as one run allows: q = 1 and one step (one Gaussian
mechanism, no subsampling to hide in; the accountant's epsilon is then the Gaussian
mechanism's), plain SGD (the update is linear in the noised gradient sum), canaries that do not
look like the data (random strings over the tokens that no training record of the site holds,
so the data's gradients do not mask them), and a base pretrained briefly on public notes.

**Normal model** (ledger epsilon `--epsilon`, 8 by default). Score of canary i: its own
per-record gradient g_i under the sent model, normalised (each record enters the sum clipped,
|g_i| >> clip norm), restricted to the positions the payload carries; the scores of all
canaries are fitted jointly to the received update by ridge regression,
s = -(G G^T + I)^-1 G d, which removes most of the interference between canaries. Shown twice:
on the topk payload (what the coordinator receives), and, for reference, on the dense update
(`dense` codec) of the same run.

**Crafted model** (`--crafted`, ledger epsilon `--crafted-epsilon`, 1 by default). A
coordinator sends finite weights that overflow one record's gradient on a trigger: every
canary is one trigger token b_i (a token no training record holds) repeated over the window.
Transformer blocks are zeroed, norms included (GLM-4's post-norms then add exactly nothing: the
model is embedding -> final RMSNorm -> untied lm_head); residual dims 0 and 1 carry a bigram
model that makes trigger tokens improbable enough that their softmax probability is exactly 0
in fp32 (so ordinary records' gradients stay finite); the other dims have final-norm gains of
2^100, no embedding weight, and lm_head weight only in the row of each trigger token. A record
whose targets are b_i then has a finite loss and a
finite gradient at every position (about 1e37), whose sum over the window overflows in the
embedding row b_i only: Opacus' clip factor C / inf = 0 and 0 * inf = NaN leave NaN in the
summed gradient, in the noised update and in the trained model at the cells (b_i, column) of
each drawn canary. The old topk encoder compares magnitudes with a threshold estimated from a
sample of positions that is seeded by the tensor size (public): NaN fails every comparison, so
NaN cells are never sent, while a NaN inside the sample makes the threshold NaN and drops the
whole tensor (the "empty payload"). The crafted model therefore puts each canary's overflow
only in columns of row b_i outside that sample. Score of canary i: minus the number of its
overflow cells that the payload carries (0 exactly when it was drawn; about 6 of ~60 when not).
m is the number of tokens that no training record holds (at most `--canaries`).
With the fix the site refuses these weights (`limits.check_weights`: |w| > 1e4), reported as
such; the bench then also calls `train_private` directly on them, which exercises the
per-record guard alone (a record whose gradient is not finite contributes zero).

`train_private`'s keyword `expected_batch_size` gets q times the site's record count.

Measured with the retired byte-level model (before the Hugging Face path) on 2 noisy CPU cores
(generated site of 200 records, `--crafted`, about 60 s a run with the base cached in --out;
delta 1e-5, q = 1, one step); figures of this version: docs/privacy.md:

| fedglm | run | m | r | v | epsilon lower (95%) | ledger epsilon | sigma |
|---|---|---|---|---|---|---|---|
| 7b91d45 (before) | normal, topk payload | 1000 | 100 | 71 | 0.308 | 7.988 | 0.601 |
| 7b91d45 (before) | normal, dense (reference) | 1000 | 200 | 175 | 1.395 | 7.988 | 0.601 |
| 7b91d45 (before) | crafted, site path | 195 | 156 | 156 | **3.347** | 0.991 | 3.766 |
| ae36930 (after) | normal, topk payload | 1000 | 100 | 73 | 0.396 | 7.988 | 0.601 |
| ae36930 (after) | normal, dense (reference) | 1000 | 100 | 91 | 1.429 | 7.988 | 0.601 |
| ae36930 (after) | crafted, site path | 195 | - | - | refused (bad-weights) | 0.991 | 3.766 |
| ae36930 (after) | crafted, train_private only | 195 | 2 | 1 | 0.000 | 0.991 | 3.766 |

Seeds 1-3 of the normal run (after): topk 0.18-0.43, dense 1.04-2.09. The crafted
`train_private only` row repeated 20 times: 0.000 every time.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import inspect
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after PYTHONPATH and the installed package: an older fedglm wins

from opacus import GradSampleModule  # noqa: E402

import fedglm  # noqa: E402
from fedglm import compression  # noqa: E402
from fedglm.compression import CODECS, NO_HASH, Header, Kind, model_hash  # noqa: E402
from fedglm.compression.select import MAX_SAMPLES, OVERSAMPLE, SAMPLES_PER_KEPT, keep_count  # noqa: E402
from fedglm.config import UplinkConfig  # noqa: E402
from fedglm.corpus import generate_public_records, generate_site_records  # noqa: E402
from fedglm.data import load_records, sample_batches, split_records, window_batch  # noqa: E402
from fedglm.models.causal import forward_logits  # noqa: E402
from fedglm.models.folder import load_model, load_tokenizer, save_folder  # noqa: E402
from fedglm.models.lora import wire_state  # noqa: E402
from fedglm.models.presets import build_glm4, glm4_config  # noqa: E402
from fedglm.models.tokenizer import encode_records, train_tokenizer  # noqa: E402
from fedglm.privacy.accounting import Release, calibrate_sigma, epsilon  # noqa: E402
from fedglm.privacy.dpsgd import per_record_loss, train_private  # noqa: E402
from fedglm.training import make_optimizer, train_local  # noqa: E402

DEVICE = torch.device("cpu")
DELTA = 1e-5
CLIP = 1.0
LR = 0.1
RIDGE = 1.0
GAIN = 2.0**100  # final-norm gain of the crafted model's trigger dims
PER_POSITION = 2.0**123  # the crafted gradient at one position: finite; ~100 of them are not


def audit_math() -> ModuleType:
    """fedglm.privacy.canary, from this tree when the fedglm in use predates it."""
    try:
        return importlib.import_module("fedglm.privacy.canary")
    except ImportError:
        spec = importlib.util.spec_from_file_location("_canary", ROOT / "fedglm" / "privacy" / "canary.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module


def model_check() -> Callable[[Mapping[str, torch.Tensor]], Any] | None:
    """The site's check of received weights, if this fedglm has one (None: an older fedglm)."""
    try:
        from fedglm.clients.limits import check_weights
    except ImportError:
        return None
    return check_weights


@dataclass
class Row:
    run: str
    m: int = 0
    r: int = 0
    v: int = 0
    bound: float | None = None
    ledger: float = 0.0
    sigma: float = 0.0
    q: float = 1.0
    steps: int = 1
    seconds: float = 0.0
    note: str = ""


def site_records(
    data: Path | None, field: str, count: int, seed: int, tokenizer: PreTrainedTokenizerFast
) -> list[list[int]]:
    """The site's training records, read and split as its ClientApp does, or generated notes,
    as token ids of the base's tokenizer."""
    if data is None:
        texts = generate_site_records(0, count, seed)
    else:
        texts = split_records(load_records(data, None, field), 0.1, 0).train[:count]
    return encode_records(tokenizer, texts)


def unused_tokens(records: list[list[int]], vocab: int) -> list[int]:
    """The token ids no record holds (the tokenizer's special tokens occur in every record)."""
    seen = {token for record in records for token in record}
    return [t for t in range(vocab) if t not in seen]


def tiny_config(tokenizer: PreTrainedTokenizerFast) -> Any:
    return glm4_config(
        "tiny",
        vocab_size=len(tokenizer),
        bos_token_id=int(tokenizer.bos_token_id),
        eos_token_id=int(tokenizer.eos_token_id),
    )


def frame(tokenizer: PreTrainedTokenizerFast, body: list[int]) -> list[int]:
    """A record of token ids `body`, framed as `encode_records` frames one."""
    bos = [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]
    return [*bos, *body, int(tokenizer.eos_token_id)]


def pretrained_base(out: Path, steps: int) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """The tiny GLM-4 preset after `steps` plain AdamW steps on generated public notes, with its
    tokenizer (cached as a base folder in --out)."""
    folder = out / f"base-tiny-{steps}"
    if (folder / "config.json").is_file():
        return load_model(folder), load_tokenizer(folder)
    public_texts = generate_public_records(3000, 0)
    tokenizer = train_tokenizer(public_texts, 2000)
    model = build_glm4(tiny_config(tokenizer), 0)
    if steps:
        public = encode_records(tokenizer, public_texts[:400])
        batches = sample_batches(
            public, batch_size=32, seq_len=128, generator=torch.Generator().manual_seed(0)
        )
        optimizer = make_optimizer(model, name="adamw", lr=3e-3, momentum=0.9, weight_decay=0.0)
        train_local(
            model, batches, optimizer=optimizer, steps=steps, precision="fp32", grad_clip=1.0, device=DEVICE
        )
    save_folder(model, tokenizer, folder)
    return model, tokenizer


def one_round(
    model: torch.nn.Module, records: list[list[int]], *, q: float, sigma: float, steps: int, seq_len: int
) -> dict[str, np.ndarray]:
    """The site's DP-SGD round on `model` (in place) as its ClientApp runs it; the model change."""
    held = {name: t.detach().float().clone() for name, t in wire_state(model).items()}
    extra: dict[str, Any] = {}
    if "expected_batch_size" in inspect.signature(train_private).parameters:
        extra["expected_batch_size"] = max(1.0, q * len(records))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_private(
            model,
            records,
            optimizer=make_optimizer(model, name="sgd", lr=LR, momentum=0.0, weight_decay=0.0),
            q=q,
            sigma=sigma,
            clip_norm=CLIP,
            steps=steps,
            seq_len=seq_len,
            precision="fp32",
            mode="hooks",
            device=DEVICE,
            **extra,
        )
    trained = wire_state(model)
    return {name: (trained[name].detach().float() - base).reshape(-1).numpy() for name, base in held.items()}


def received(
    values: dict[str, np.ndarray], held: Mapping[str, torch.Tensor], codec: str, density: float
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """What the coordinator decodes from the site's payload: per tensor (positions, values)."""
    shapes = {name: tuple(t.shape) for name, t in held.items()}
    chosen = CODECS[codec]
    header = Header(Kind.UPDATE, chosen.codec_id, 1, model_hash(held), NO_HASH)
    blob = compression.encode(
        {k: v.copy() for k, v in values.items()},
        shapes,
        chosen,
        header,
        density=density,
        selection="per-tensor",
    )
    _, tensors = compression.decode(blob, shapes)
    out = {}
    for name, decoded in tensors.items():
        n = math.prod(shapes[name])
        positions = np.arange(n) if decoded.positions is None else decoded.positions
        out[name] = (positions, decoded.dense(n)[positions])
    return out


# --- the normal model -------------------------------------------------------------------


def canary_gradients(
    model: torch.nn.Module, canaries: list[list[int]], seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each canary's per-record gradient under `model`, flattened in state-dict order, and its norm."""
    module = GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="sum")
    module.train()  # Opacus records activations in training mode only (the model has no dropout)
    params = dict(module._module.named_parameters())
    names = list(wire_state(model))
    rows, norms = [], []
    try:
        for first in range(0, len(canaries), 100):
            picks = list(range(first, min(len(canaries), first + 100)))
            inputs, targets = window_batch(canaries, picks, seq_len=seq_len, generator=torch.Generator())
            module.zero_grad(set_to_none=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                per_record_loss(forward_logits(module, inputs), targets).sum().backward()
            flat = torch.cat([params[n].grad_sample.reshape(len(picks), -1) for n in names], dim=1)
            for p in params.values():
                p.grad_sample = None
            rows.append(flat)
            norms.append(flat.norm(dim=1))
    finally:
        module._close()
    return torch.cat(rows), torch.cat(norms)


def ridge_scores(gradients: torch.Tensor, norms: torch.Tensor, update: torch.Tensor) -> np.ndarray:
    """Each canary's weight in `update`, fitted jointly: -(G G^T + RIDGE I)^-1 G update."""
    unit = gradients / norms.clamp(min=1e-12)[:, None]
    gram = unit @ unit.T
    fitted = torch.linalg.solve(gram + RIDGE * torch.eye(len(gram)), unit @ update)
    scores: np.ndarray = (-fitted).double().numpy()
    return scores


def normal_audit(
    args: argparse.Namespace,
    base: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    data: list[list[int]],
    canary: ModuleType,
) -> list[Row]:
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    alphabet = unused_tokens(data, len(tokenizer)) or list(range(len(tokenizer)))
    body = args.seq_len - 1
    canaries = [frame(tokenizer, rng.choice(alphabet, size=body).tolist()) for _ in range(args.canaries)]
    included = rng.random(args.canaries) < 0.5
    records = data + [c for c, inside in zip(canaries, included, strict=True) if inside]
    q, steps = args.q, args.steps
    sigma = calibrate_sigma(target_epsilon=args.epsilon, delta=DELTA, q=q, steps=steps, accountant="prv")
    ledger = epsilon([Release(sigma, q, steps)], DELTA, "prv")
    model = copy.deepcopy(base)
    held = {name: t.detach().float().clone() for name, t in wire_state(model).items()}
    check = model_check()
    note = "model check passed" if check is not None else "no model check in this fedglm"
    if check is not None:
        check(held)
    values = one_round(model, records, q=q, sigma=sigma, steps=steps, seq_len=args.seq_len)
    gradients, norms = canary_gradients(base, canaries, args.seq_len)
    offsets = np.cumsum([0] + [v.size for v in values.values()])
    rows = []
    for label, codec, density in (
        ("normal, topk payload", "topk", args.density),
        ("normal, dense (reference)", "dense", 1.0),
    ):
        tensors = received(values, held, codec, density)
        positions = np.concatenate(
            [tensors[n][0] + offsets[i] for i, n in enumerate(values) if n in tensors]
            or [np.zeros(0, np.int64)]
        )
        update = np.concatenate([tensors[n][1] for n in values if n in tensors] or [np.zeros(0, np.float32)])
        index = torch.from_numpy(positions.astype(np.int64))
        scores = ridge_scores(gradients[:, index], norms, torch.from_numpy(update.astype(np.float32)))
        result = canary.audit_scores(scores, included, delta=DELTA)
        rows.append(
            Row(label, result.m, result.r, result.v, result.epsilon, ledger, sigma, q, steps, 0.0, note)
        )
    seconds = time.perf_counter() - started
    for row in rows:
        row.seconds = seconds
    return rows


# --- the crafted model ------------------------------------------------------------------


def encoder_sample(n: int, density: float) -> set[int]:
    """The positions whose magnitudes set the topk threshold of an n-value tensor (public code:
    `compression/select.py`, a sample seeded by n)."""
    target = min(n, math.ceil(OVERSAMPLE * keep_count(n, density)))
    size = min(MAX_SAMPLES, math.ceil(SAMPLES_PER_KEPT * n / max(target, 1)))
    if size >= n:
        return set(range(n))
    return set(np.random.default_rng(n).integers(0, n, size=size).tolist())


EMBED = "model.embed_tokens.weight"


def crafted_model(
    tokenizer: PreTrainedTokenizerFast, triggers: list[int], density: float, seq_len: int
) -> tuple[torch.nn.Module, dict[int, list[int]]]:
    """The coordinator's crafted model (see the module docstring) and, per trigger token, the
    embedding columns its gradient overflows in."""
    config = tiny_config(tokenizer)
    model = build_glm4(config, 0)
    d, vocab = int(config.hidden_size), int(config.vocab_size)
    sampled = encoder_sample(vocab * d, density)
    columns = {b: [c for c in range(2, d) if b * d + c not in sampled] for b in triggers}
    inv_rms = 1.0 / math.sqrt(1.0 / d + float(config.rms_norm_eps))  # RMSNorm of a one-hot row
    omega = PER_POSITION * seq_len / (GAIN * inv_rms)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.0)  # every block, its norms included, adds nothing to the residual stream
        embed, head, norm = model.model.embed_tokens.weight, model.lm_head.weight, model.model.norm.weight
        embed[:, 0] = 1.0
        head[:, :2] = 1.0
        norm[:2] = 1.0
        norm[2:] = GAIN
        for b in triggers:
            embed[b, 0], embed[b, 1] = 0.0, 1.0
            head[b, :2] = -(110.0 / inv_rms)  # softmax probability exactly 0 in fp32
            head[b, columns[b]] = omega
    return model, columns


def crafted_audit(
    args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast, data: list[list[int]], canary: ModuleType
) -> list[Row]:
    triggers = unused_tokens(data, len(tokenizer))[: args.canaries]
    m = len(triggers)
    if m == 0:
        return [Row("crafted", note="every token occurs in the data: no trigger token")]
    rng = np.random.default_rng(args.seed + 1)
    included = rng.random(m) < 0.5
    canaries = [frame(tokenizer, [b] * (args.seq_len - 1)) for b in triggers]  # one whole window
    records = data + [c for c, inside in zip(canaries, included, strict=True) if inside]
    q, steps = args.q, args.steps
    sigma = calibrate_sigma(
        target_epsilon=args.crafted_epsilon, delta=DELTA, q=q, steps=steps, accountant="prv"
    )
    ledger = epsilon([Release(sigma, q, steps)], DELTA, "prv")
    check = model_check()
    runs = [("crafted, site path", check)] + ([("crafted, train_private only", None)] if check else [])
    rows = []
    for label, guard in runs:
        started = time.perf_counter()
        model, columns = crafted_model(tokenizer, triggers, args.density, args.seq_len)
        held = {name: t.detach().float().clone() for name, t in wire_state(model).items()}
        row = Row(label, m=m, ledger=ledger, sigma=sigma, q=q, steps=steps)
        rows.append(row)
        if guard is not None:
            try:
                guard(held)
            except Exception as exc:
                reason = getattr(exc, "reason", type(exc).__name__)
                row.note = f"refused by the site's model check ({reason}: {str(exc)[:48]}...)"
                row.seconds = time.perf_counter() - started
                continue
        elif check is None:
            row.note = "no model check in this fedglm; "
        values = one_round(model, records, q=q, sigma=sigma, steps=steps, seq_len=args.seq_len)
        nonfinite = sum(int((~np.isfinite(v)).sum()) for v in values.values())
        try:
            tensors = received(values, held, "topk", args.density)
        except ValueError as exc:  # the new encoder refuses a non-finite update
            row.note += f"encoder refused the update: {str(exc)[:60]}"
            row.seconds = time.perf_counter() - started
            continue
        d = held[EMBED].shape[1]
        sent = set(tensors[EMBED][0].tolist()) if EMBED in tensors else set()
        scores = np.array([-sum(b * d + c in sent for c in columns[b]) for b in triggers], dtype=np.float64)
        result = canary.audit_scores(scores, included, delta=DELTA)
        row.r, row.v, row.bound = result.r, result.v, result.epsilon
        row.note += f"{nonfinite} non-finite values in the update; {EMBED} " + (
            f"sent ({len(sent)} positions)" if sent else "NOT sent"
        )
        row.seconds = time.perf_counter() - started
    return rows


def print_table(rows: list[Row]) -> None:
    print(
        f"\n{'run':28s} {'m':>5s} {'r':>5s} {'v':>5s} {'eps lower (95%)':>15s} {'ledger eps':>10s} "
        f"{'delta':>7s} {'sigma':>7s} {'q':>5s} {'steps':>5s} {'seconds':>7s}  note"
    )
    for row in rows:
        bound = "-" if row.bound is None else f"{row.bound:.3f}"
        print(
            f"{row.run:28s} {row.m:5d} {row.r:5d} {row.v:5d} {bound:>15s} {row.ledger:10.3f} "
            f"{DELTA:7.0e} {row.sigma:7.3f} {row.q:5g} {row.steps:5d} {row.seconds:7.1f}  {row.note}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, help="the site's records: CSV / JSONL / folder (default: generated)"
    )
    parser.add_argument("--field", default="transcription", help="CSV column or JSONL field of --data")
    parser.add_argument("--records", type=int, default=200, help="the site's training records")
    parser.add_argument(
        "--canaries", type=int, default=1000, help="m (the crafted run: at most the unused tokens)"
    )
    parser.add_argument("--epsilon", type=float, default=8.0, help="ledger epsilon of the normal run")
    parser.add_argument("--crafted", action="store_true", help="also audit the crafted coordinator model")
    parser.add_argument(
        "--crafted-epsilon", type=float, default=1.0, help="ledger epsilon of the crafted run"
    )
    parser.add_argument("--skip-normal", action="store_true")
    parser.add_argument("--q", type=float, default=1.0, help="Poisson sampling rate")
    parser.add_argument("--steps", type=int, default=1, help="DP-SGD steps of the round")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--density", type=float, default=UplinkConfig().density, help="topk uplink density")
    parser.add_argument(
        "--pretrain-steps", type=int, default=150, help="public pretraining of the base (0: random)"
    )
    parser.add_argument("--seed", type=int, default=0, help="canaries and their inclusion draws")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-privacy-audit")
    args = parser.parse_args()
    canary = audit_math()
    print(
        f"fedglm from {Path(fedglm.__file__).parent}; site model check: {model_check() is not None}",
        flush=True,
    )
    started = time.perf_counter()
    base, tokenizer = pretrained_base(args.out, args.pretrain_steps)
    print(
        f"base: tiny GLM-4, vocabulary {len(tokenizer)}, {args.pretrain_steps} public steps "
        f"({time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    data = site_records(args.data, args.field, args.records, args.seed, tokenizer)
    unused = len(unused_tokens(data, len(tokenizer)))
    print(f"site: {len(data)} training records, {unused} of {len(tokenizer)} tokens unused", flush=True)
    rows: list[Row] = []
    if not args.skip_normal:
        rows += normal_audit(args, base, tokenizer, data, canary)
    if args.crafted:
        rows += crafted_audit(args, tokenizer, data, canary)
    print_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"fedglm": str(Path(fedglm.__file__).parent), "delta": DELTA, "rows": [asdict(r) for r in rows]}
    (args.out / "privacy_audit.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
