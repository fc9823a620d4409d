"""Attacks on a site's privacy by a curious or malicious coordinator, and by a site on its own
ledger, each written as the attack itself (issue 14). Every test here failed on the code
before the fix."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Message, RecordDict
from typer.testing import CliRunner

from fedglm.cli.main import app
from fedglm.clients import limits
from fedglm.clients.app import train
from fedglm.clients.site import load_site_data, read_site
from fedglm.compression import CODECS, NO_HASH, Header, Kind, PayloadError, decode, encode
from fedglm.config import PrivacyConfig, TrainConfig
from fedglm.errors import InputError
from fedglm.models.base import BaseModel
from fedglm.models.causal import forward_logits
from fedglm.models.lora import LoraSpec, add_adapters, is_trained_adapter, wire_state
from fedglm.models.tokenizer import encode_record
from fedglm.payload import LEDGER_KEY, RECEIPT_KEY, read_payload
from fedglm.privacy.accounting import Release, epsilon
from fedglm.privacy.dpsgd import DPMode, train_private
from fedglm.privacy.keys import key_id, public_pem
from fedglm.privacy.ledger import GENESIS, sign_line
from fedglm.privacy.site import LEDGER_FILE, RECEIPTS_FILE, privacy_dir
from fedglm.server.countersign import Countersigner
from tests.bases import tokenizer
from tests.clients.handler import coordinator_state, site_context, train_message
from tests.privacy.helpers import Site, ledger_of
from tests.server.test_countersign import BASE, BLOB, entry

CPU = torch.device("cpu")
BEL = "\x07"  # a character no ordinary note contains: its byte-level token is the trigger


# --- 1. The update's scale must not reveal the record count ------------------------------------


def test_the_update_norm_does_not_reveal_a_private_record_count(tmp_path: Path, tiny_base: Path) -> None:
    """The coordinator picks SGD, one step and the dense codec, then inverts the update's norm:
    |update| ~ lr * sigma * C * sqrt(d) / B, and B was q * n. Now B is public."""
    q, sigma, lr = 0.2, 1.0, 1.0
    coordinator = TrainConfig(optimizer="sgd", lr=lr, momentum=0.0, local_steps=1, seq_len=32)
    privacy = PrivacyConfig(sample_rate=q, noise_multiplier=sigma, rounds=1, clip_norm=1.0)
    estimates = {}
    for total in (168, 169):  # 150 and 151 training records after the site's validation split
        message, broadcast = train_message(tiny_base, coordinator, uplink=("dense", 1.0))
        notes = [f"note {i}: patient stable, follow up in {i % 9} weeks." for i in range(total)]
        context = site_context(tmp_path / str(total), notes, privacy, base=tiny_base)
        n = len(load_site_data(read_site(context)).train)
        reply = train(message, context)
        blob = read_payload(reply.content)
        assert blob is not None
        _, tensors = decode(blob, broadcast.update_shapes)
        sizes = {name: math.prod(shape) for name, shape in broadcast.update_shapes.items()}
        change = np.concatenate([tensors[name].dense(sizes[name]) for name in sizes])
        d = change.size
        estimate = lr * sigma * privacy.clip_norm * math.sqrt(d) / (q * float(np.linalg.norm(change)))
        entry = json.loads(reply.content.config_records[LEDGER_KEY]["line"])["entry"]
        estimates[n] = estimate
        assert entry["expected_batch"] == coordinator.batch_size  # public: the coordinator's own
        assert entry["record_count_public"] is False
    assert sorted(estimates) == [150, 151]
    for n, estimate in estimates.items():
        # what the attack recovers is the public batch over q (80), not the record count
        assert abs(estimate - coordinator.batch_size / q) < 0.1 * coordinator.batch_size / q
        assert abs(estimate - n) > 30


# --- 2. A record whose gradient overflows must contribute exactly zero --------------------------


def trigger_id() -> int:
    ids: list[int] = tokenizer().encode(BEL, add_special_tokens=False)
    assert len(ids) == 1
    return ids[0]


def trigger_model(model: torch.nn.Module, trigger: int) -> torch.nn.Module:
    """`model` (a GLM-4, in place) with finite weights that overflow to inf only at a position
    holding `trigger`: four channels of the fused gate/up projection fire on the trigger's own
    embedding direction (no other token has it, and nothing writes to it) and their product
    overflows; zero output weights turn inf into NaN."""
    glm: Any = model  # a Glm4ForCausalLM: its submodules by name
    channels = glm.config.intermediate_size
    with torch.no_grad():
        embed = glm.model.embed_tokens.weight
        embed[:, 0] = 0.0
        embed[trigger] = 0.0
        embed[trigger, 0] = 1.0
        for layer in glm.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
            gate_up = layer.mlp.gate_up_proj.weight  # gate rows, then up rows
            for rows in (slice(0, 4), slice(channels, channels + 4)):
                gate_up[rows] = 0.0
                gate_up[rows, 0] = 1e20
            layer.mlp.down_proj.weight[:, :4] = 0.0
    return model


def plain_records() -> list[list[int]]:
    return [encode_record(tokenizer(), f"note {i}: patient stable") for i in range(20)]


def triggered() -> list[int]:
    record = encode_record(tokenizer(), f"note: patient {BEL} stable")
    assert trigger_id() in record and all(trigger_id() not in note for note in plain_records())
    return record


def dp_change(
    base: Path, records: list[list[int]], mode: DPMode, lora: LoraSpec | None
) -> dict[str, torch.Tensor]:
    """One DP-SGD step (every record drawn, no noise, fixed generators) on the trigger model."""
    model = trigger_model(BaseModel.open(base).build(lora=None), trigger_id())
    if lora is not None:
        model = add_adapters(model, lora)
    before = {k: v.clone() for k, v in wire_state(model).items()}
    train_private(
        model,
        records,
        optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
        q=1.0,
        sigma=0.0,
        clip_norm=1.0,
        steps=1,
        seq_len=48,  # longer than every record: no window is drawn at random
        precision="fp32",
        mode=mode,
        device=CPU,
        expected_batch_size=20.0,
        sampling=torch.Generator().manual_seed(1),
        noise=torch.Generator().manual_seed(2),
    )
    return {k: v - before[k] for k, v in wire_state(model).items()}


@pytest.mark.parametrize(
    ("mode", "lora"),
    [
        ("hooks", None),
        ("ghost", None),
        ("hooks", LoraSpec(rank=2, alpha=4.0, targets=("gate_up_proj", "q_proj"), seed=1)),
    ],
)
def test_a_record_that_triggers_an_overflow_contributes_exactly_zero(
    mode: DPMode, lora: LoraSpec | None, tiny_base: Path
) -> None:
    model = trigger_model(BaseModel.open(tiny_base).build(lora=None), trigger_id())
    with torch.no_grad():  # the attack works: the trigger alone overflows
        assert bool(torch.isfinite(forward_logits(model, torch.tensor(plain_records()[:1]))).all())
        assert not bool(torch.isfinite(forward_logits(model, torch.tensor([triggered()]))).all())
    without = dp_change(tiny_base, plain_records(), mode, lora)
    with_trigger = dp_change(tiny_base, [*plain_records(), triggered()], mode, lora)
    assert all(bool(torch.isfinite(v).all()) for v in with_trigger.values())
    assert any(bool(v.abs().sum() > 0) for v in without.values())
    for name, change in without.items():
        torch.testing.assert_close(with_trigger[name], change, rtol=1e-5, atol=1e-7, msg=name)
    if lora is not None:  # only B moved: the base and A are frozen
        moved = {name for name, change in with_trigger.items() if bool(change.any())}
        assert moved and all(is_trained_adapter(name) for name in moved)


def test_the_encoder_refuses_a_non_finite_update_instead_of_sending_nothing() -> None:
    values = {"w": np.array([1.0, np.nan, 2.0], dtype=np.float32)}
    header = Header(Kind.UPDATE, CODECS["topk"].codec_id, 1, bytes(32), NO_HASH)
    with pytest.raises(ValueError, match="NaN or infinite"):
        encode(values, {"w": (3,)}, CODECS["topk"], header, density=0.5)
    assert np.isnan(values["w"][1]) and values["w"][0] == 1.0  # nothing became a residual


def _crafted_base(base: Path, train_cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The coordinator's starting model with the trigger weights (1e20) in its frozen base."""
    opened = BaseModel.open(base)
    lora = train_cfg.lora_spec(0, opened.family)
    model = trigger_model(opened.build(lora=None), trigger_id())
    return dict(wire_state(add_adapters(model, lora) if lora is not None else model))


def _crafted_adapters(base: Path, train_cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The site's own base, but LoRA's B matrices at 1e20."""
    state, trainable = coordinator_state(base, train_cfg)
    assert trainable
    return {name: torch.full_like(t, 1e20) if name in trainable else t for name, t in state.items()}


def _non_finite(base: Path, train_cfg: TrainConfig) -> dict[str, torch.Tensor]:
    state, _ = coordinator_state(base, train_cfg)
    name = "model.layers.0.mlp.down_proj.weight"
    state[name] = state[name].clone()
    state[name][0, 0] = math.nan
    return state


LORA_TRAIN = TrainConfig(adapters="lora", lora_rank=2, local_steps=1, seq_len=32)


@pytest.mark.parametrize(
    ("craft", "train_cfg", "fragment", "reason"),
    [
        (_crafted_base, TrainConfig(local_steps=1, seq_len=32), "magnitude 1e\\+20", "bad-weights"),
        # (refused as the payload is decoded, before any weight is checked)
        (_non_finite, TrainConfig(local_steps=1, seq_len=32), "NaN or infinite", "non-finite"),
        # under LoRA the base is the site's own: a full model with another base is refused as such
        (_crafted_base, LORA_TRAIN, "the full model's frozen base hashes to", "wrong-base"),
        (_crafted_adapters, LORA_TRAIN, "magnitude 1e\\+20", "bad-weights"),
    ],
    ids=["full-trigger-weights", "full-nan", "lora-trigger-base", "lora-huge-adapters"],
)
def test_a_site_refuses_a_crafted_model_before_training(
    tmp_path: Path, tiny_base: Path, craft: Any, train_cfg: TrainConfig, fragment: str, reason: str
) -> None:
    """The trigger model's weights (1e20) are beyond any trained model's, NaN is no weight at
    all: refused on arrival (a FULL model announcing the site's own base), with no ledger entry
    and no budget spent."""
    message, _ = train_message(tiny_base, train_cfg, state=craft(tiny_base, train_cfg))
    privacy = PrivacyConfig(sample_rate=0.5, noise_multiplier=1.0, rounds=1)
    context = site_context(tmp_path, [f"note {i}" for i in range(30)], privacy, base=tiny_base)
    with pytest.raises(PayloadError, match=fragment) as refused:
        train(message, context)
    assert refused.value.reason == reason
    assert not (privacy_dir(tmp_path / "state") / LEDGER_FILE).exists()


@pytest.mark.parametrize(
    ("section", "changes", "fragment"),
    [
        # a site of 4 GiB (below): per-record gradients of 65,536 records of a full model do not fit
        ("train", {"batch_size": 65536}, "GiB here"),
        # the model's size is the site's own folder's: a coordinator naming another is refused
        ("model", {"d_model": 2**40}, "d_model"),
        ("train", {"adapters": "lora", "lora_rank": 2**40}, "lora_rank"),
        ("train", {"adapters": "lora", "lora_targets": ["gate_proj"]}, "not a projection of Glm4ForCausalLM"),
        ("train", {"seq_len": 4096}, "exceeds the base model's 256 positions"),
        ("train", {"local_steps": 10**9}, "local_steps"),
        ("train", {"lr": math.inf}, "lr"),
        ("train", {"local_steps": None, "local_epochs": 1000.0}, "DP-SGD steps"),  # 1000 / q = 2e5
    ],
)
def test_a_site_refuses_a_round_it_could_not_run_before_allocating(
    tmp_path: Path,
    tiny_base: Path,
    monkeypatch: pytest.MonkeyPatch,
    section: str,
    changes: dict[str, Any],
    fragment: str,
) -> None:
    monkeypatch.setattr(limits, "physical_memory", lambda: 4 * 2**30)
    message, _ = train_message(tiny_base, TrainConfig(seq_len=32))
    config = message.content.config_records["config"]
    for key, value in changes.items():
        if value is None:
            del config[f"{section}.{key}"]
        else:
            config[f"{section}.{key}"] = value
    privacy = PrivacyConfig(sample_rate=0.005, noise_multiplier=1.0, rounds=1)
    context = site_context(tmp_path, [f"note {i}" for i in range(30)], privacy, base=tiny_base)
    with pytest.raises((InputError, PayloadError), match=fragment):
        train(message, context)
    assert not (privacy_dir(tmp_path / "state") / LEDGER_FILE).exists()


def test_the_same_round_fits_a_site_of_that_size(
    tmp_path: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusal above is the coordinator's batch, not the 4 GiB: the default batch trains."""
    monkeypatch.setattr(limits, "physical_memory", lambda: 4 * 2**30)
    message, _ = train_message(tiny_base, TrainConfig(local_steps=1, seq_len=32))
    privacy = PrivacyConfig(sample_rate=0.5, noise_multiplier=1.0, rounds=1)
    context = site_context(tmp_path, [f"note {i}" for i in range(30)], privacy, base=tiny_base)
    assert read_payload(train(message, context).content) is not None


# --- 3. A lost or rolled-back ledger must not reset the budget ---------------------------------


def chain(n: int, key: Ed25519PrivateKey, **changes: Any) -> list[dict[str, Any]]:
    """n signed ledger lines of one site, chained, each naming BLOB as its update."""
    lines: list[dict[str, Any]] = []
    prev = GENESIS
    for sequence in range(n):
        fields = entry(
            key=key_id(key.public_key()),
            run="run-1",
            round=sequence + 1,
            sequence=sequence,
            epsilon=1.0 + sequence,
            prev=prev,
        )
        line = sign_line({**fields, **changes}, key)
        lines.append(line)
        prev = line["hash"]
    return lines


def sent(
    line: dict[str, Any], key: Ed25519PrivateKey, earlier: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    record: dict[str, Any] = {"line": json.dumps(line), "public-key": public_pem(key.public_key())}
    if earlier:
        record["earlier"] = [json.dumps(x) for x in earlier]
    return record


def test_the_coordinator_refuses_a_ledger_that_starts_over(tmp_path: Path) -> None:
    """The site deletes its ledger after three rounds and signs a new sequence 0 with a lower
    epsilon: the coordinator used to countersign (0, 1.0), (1, 2.0), (2, 3.0), (0, 1.0)."""
    key = Ed25519PrivateKey.generate()
    desk = Countersigner(Ed25519PrivateKey.generate(), tmp_path / "receipts", "run-1")
    lines = chain(3, key)
    for server_round, line in enumerate(lines, start=1):
        desk.countersign(7, sent(line, key), BLOB, server_round, BASE)
    restart = chain(1, key, round=4)[0]
    with pytest.raises(PayloadError, match="entry 0 differs from the one countersigned"):
        desk.countersign(7, sent(restart, key), BLOB, 4, BASE)
    # nor after a coordinator restart: the chain is rebuilt from its receipts
    again = Countersigner(desk.key, desk.folder, "run-1")
    with pytest.raises(PayloadError, match="entry 0 differs"):
        again.countersign(7, sent(restart, key), BLOB, 4, BASE)
    assert [json.loads(r)["receipt"]["sequence"] for r in (desk.folder / "site-a.jsonl").open()] == [0, 1, 2]


def test_the_coordinator_refuses_a_fork_a_gap_and_a_lower_epsilon(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    desk = Countersigner(Ed25519PrivateKey.generate(), tmp_path / "receipts", "run-1")
    lines = chain(4, key)
    desk.countersign(7, sent(lines[0], key), BLOB, 1, BASE)
    skipped = dict(lines[2]["entry"], round=2)
    with pytest.raises(PayloadError, match="does not follow the last countersigned entry 0"):
        desk.countersign(7, sent(sign_line(skipped, key), key), BLOB, 2, BASE)
    forked = dict(lines[1]["entry"], prev="ab" * 32)
    with pytest.raises(PayloadError, match="does not follow"):
        desk.countersign(7, sent(sign_line(forked, key), key), BLOB, 2, BASE)
    lower = dict(lines[1]["entry"], epsilon=0.5)
    with pytest.raises(PayloadError, match=r"below the 1\.0000 already countersigned"):
        desk.countersign(7, sent(sign_line(lower, key), key), BLOB, 2, BASE)
    # a reply lost in a crash: the next one carries the missing line, and both are receipted
    desk.countersign(7, sent(dict(lines[2], entry=lines[2]["entry"]), key, earlier=[lines[1]]), BLOB, 3, BASE)
    assert len(desk.receipt_for(7)) == 3  # round 1's, and the two new ones


def test_a_site_refuses_to_train_on_a_ledger_behind_its_receipts(tmp_path: Path) -> None:
    """Deleting (or restoring an old copy of) the ledger would reset the budget."""
    site: Site = ledger_of(tmp_path, rounds=3)
    folder = privacy_dir(site.state_dir)
    shutil.copy(site.receipts, folder / RECEIPTS_FILE)  # the site keeps the coordinator's receipts
    ledger = folder / LEDGER_FILE
    old = ledger.read_text().splitlines(keepends=True)
    ledger.write_text("".join(old[:2]))  # rolled back to an older copy
    with pytest.raises(InputError, match="behind the coordinator's receipt for its entry 2"):
        site.lines()
    ledger.unlink()
    with pytest.raises(InputError, match=r"entry 2 \(missing there"):
        site.lines()


def test_a_site_with_earlier_rounds_and_no_ledger_stops(tmp_path: Path, tiny_base: Path) -> None:
    """Both ledger and receipts are gone, but the residual shows the site has trained."""
    privacy = PrivacyConfig(sample_rate=0.5, noise_multiplier=1.0, rounds=2)
    context = site_context(tmp_path, [f"note {i}: stable" for i in range(30)], privacy, base=tiny_base)
    message, _ = train_message(tiny_base, TrainConfig(local_steps=1, seq_len=32))
    train(message, context)
    shutil.rmtree(privacy_dir(tmp_path / "state"))
    message, _ = train_message(tiny_base, TrainConfig(local_steps=1, seq_len=32), server_round=2)
    with pytest.raises(InputError, match=r"is missing, but .*residual\.pt shows this site trained before"):
        train(message, context)


def test_the_site_keeps_the_receipts_the_coordinator_sends(tmp_path: Path, tiny_base: Path) -> None:
    privacy = PrivacyConfig(sample_rate=0.5, noise_multiplier=1.0, rounds=2)
    context = site_context(tmp_path, [f"note {i}: stable" for i in range(30)], privacy, base=tiny_base)
    message, broadcast = train_message(tiny_base, TrainConfig(local_steps=1, seq_len=32))
    reply = train(message, context)
    desk = Countersigner(Ed25519PrivateKey.generate(), tmp_path / "receipts", "run")
    blob = read_payload(reply.content)
    assert blob is not None
    desk.countersign(1, dict(reply.content.config_records[LEDGER_KEY]), blob, 1, broadcast.hash)
    second, _ = train_message(tiny_base, TrainConfig(local_steps=1, seq_len=32), server_round=2)
    second = Message(
        content=RecordDict({**second.content, RECEIPT_KEY: ConfigRecord({"lines": desk.receipt_for(1)})}),
        metadata=second.metadata,
    )
    train(second, context)
    receipts = (privacy_dir(tmp_path / "state") / RECEIPTS_FILE).read_text().splitlines()
    assert [json.loads(r)["receipt"]["sequence"] for r in receipts] == [0]


# --- 4. The audit must say what it proves ------------------------------------------------------


def audit(site: Site, ledger: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        app, ["audit", str(ledger), "--public-key", str(site.state_dir / "ledger.pub"), *extra]
    )
    return result.exit_code, result.stdout + result.stderr


def re_signed(site: Site, path: Path, **changes: Any) -> Path:
    """The site rewrites every entry of its ledger, chains and signs it anew with its own key."""
    lines: list[dict[str, Any]] = []
    prev = GENESIS
    for raw in site.ledger.read_text().splitlines():
        entry = dict(json.loads(raw)["entry"], prev=prev)
        entry.update({k: v(entry) if callable(v) else v for k, v in changes.items()})
        line = sign_line(entry, site.key)
        lines.append(line)
        prev = line["hash"]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture
def countersigned(tmp_path: Path) -> Site:
    site = ledger_of(tmp_path / "site", rounds=3)
    (site.state_dir / "receipt.pub").write_text(public_pem(site.server_key.public_key()))
    return site


def halved_q_epsilon(entry: dict[str, Any]) -> float:
    """The epsilon a site would claim for its history had q been half as large."""
    release = Release(entry["sigma"], entry["q"] / 2, entry["steps"])
    return epsilon([release] * (entry["sequence"] + 1), entry["delta"], "prv")


@pytest.mark.parametrize(
    "changes",
    [{"q": lambda e: e["q"] / 2, "epsilon": halved_q_epsilon}, {"budget": 100.0}],
    ids=["halved-q", "raised-budget"],
)
def test_a_ledger_re_signed_by_its_site_is_not_verified_without_receipts(
    countersigned: Site, tmp_path: Path, changes: dict[str, Any]
) -> None:
    forged = re_signed(countersigned, tmp_path / "forged.jsonl", **changes)
    code, out = audit(countersigned, forged)  # every claim is consistent: the weaker verdict
    assert code == 3 and "NOT VERIFIED against the coordinator" in out
    server = ["--server-key", str(countersigned.state_dir / "receipt.pub")]
    code, out = audit(countersigned, forged, *server, "--receipts", str(countersigned.receipts))
    assert code == 1 and "countersigned a different entry" in out
    code, out = audit(countersigned, countersigned.ledger, *server, "--receipts", str(countersigned.receipts))
    assert code == 0 and "OK, verified against the coordinator" in out


def test_a_budget_raised_between_lines_is_flagged(countersigned: Site, tmp_path: Path) -> None:
    forged = re_signed(countersigned, tmp_path / "forged.jsonl", budget=lambda e: 8.0 + e["sequence"])
    code, out = audit(countersigned, forged)
    assert code == 1 and "budget changed from 8 to 9" in out


def test_an_entry_without_a_receipt_fails_with_the_receipts(countersigned: Site, tmp_path: Path) -> None:
    receipts = tmp_path / "receipts.jsonl"
    receipts.write_text("".join(countersigned.receipts.read_text().splitlines(keepends=True)[:2]))
    code, out = audit(
        countersigned,
        countersigned.ledger,
        "--server-key",
        str(countersigned.state_dir / "receipt.pub"),
        "--receipts",
        str(receipts),
    )
    assert code == 1 and "entry 2 has no receipt from the coordinator" in out


def test_a_duplicate_json_key_is_refused_by_the_audit_and_the_coordinator(
    countersigned: Site, tmp_path: Path
) -> None:
    """`"epsilon": 9.5, ..., "epsilon": 0.5`: Python keeps the last value, another reader the first."""
    last = countersigned.ledger.read_text().splitlines()[-1]
    duplicated = last.replace('"epsilon": ', '"epsilon": 9.5, "epsilon": ', 1)
    assert json.loads(duplicated)["entry"] == json.loads(last)["entry"]  # what Python alone sees
    forged = tmp_path / "dup.jsonl"
    forged.write_text(
        "".join(countersigned.ledger.read_text().splitlines(keepends=True)[:-1]) + duplicated + "\n"
    )
    code, out = audit(countersigned, forged)
    assert code == 1 and "duplicate key 'epsilon'" in out
    desk = Countersigner(Ed25519PrivateKey.generate(), tmp_path / "receipts", "run-1")
    record = {"line": duplicated, "public-key": public_pem(countersigned.public)}
    with pytest.raises(PayloadError, match="duplicate key"):
        desk.countersign(7, record, BLOB, 3, BASE)


# --- 7. What reaches the coordinator in an error -----------------------------------------------


def test_an_error_sent_to_the_coordinator_names_no_record_count(tmp_path: Path, tiny_base: Path) -> None:
    privacy = PrivacyConfig(sample_rate=0.5, noise_multiplier=1.0, rounds=1, delta=1e-3)
    context = site_context(tmp_path, [f"note {i}: stable" for i in range(1234)], privacy, base=tiny_base)
    n = len(load_site_data(read_site(context)).train)
    message, _ = train_message(tiny_base, TrainConfig(seq_len=32))
    with pytest.raises(InputError, match="delta") as raised:
        train(message, context)
    assert str(n) not in str(raised.value) and str(n + 1) not in str(raised.value)
