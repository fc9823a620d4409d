"""The model card beside the exported files: `MODEL_CARD.md` for people, `model_card.json` for tools.

Built only from what the run folder records, so every figure is measured, none typed in:
- the base model's provenance (`base.json`, the manifest of `fedglm pretrain` copied into the
  run folder: hash, input files and their SHA-256, steps) and how it was fine-tuned (all
  weights, or LoRA adapters merged after the run);
- architecture and sizes: the configured model, the pruned global model (`checkpoint.pt`), the
  student (`release/distill.json`);
- validation: the sites' last federated evaluation (where they declared losses public) and the
  held-out public-text loss and bits per byte of teacher and student;
- parity of each exported file (`release/export.json`);
- traffic: upload and download bytes summed over `metrics.jsonl`;
- privacy: for each site, from the ledger lines the coordinator countersigned
  (`ledgers/<site>.jsonl`): the largest epsilon among them (never a later, lower claim), the
  last line's unit of privacy, delta, accountant, sampler, q, sigma; where the site's record
  count is public, also the replace-one epsilon of the same history; and the guarantee's
  exclusions (`EXCLUSIONS`). A site with no countersigned entry trained without DP and the card
  says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedglm import metrics
from fedglm.atomic import atomic_write_text
from fedglm.config import RunSpec, SelectionConfig, TrainConfig
from fedglm.errors import InputError
from fedglm.layout import (
    CARD_JSON,
    CARD_MD,
    LEDGER_COPIES,
    RELEASE_DIR,
    SPEC_NAME,
)
from fedglm.layout import MANIFEST_FILE as BASE_MANIFEST
from fedglm.models.base import BaseModel, meta_model
from fedglm.models.families import describe
from fedglm.models.pruning import Mask, pruned_config
from fedglm.privacy.audit import dp_accounting_epsilon
from fedglm.privacy.ledger import parse_ledger, split_releases
from fedglm.privacy.site import history
from fedglm.reports import DistillReport, ExportReport, read_report
from fedglm.server.selection import best_round, released_checkpoint


def _json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


GUARANTEE = (
    "Each site's (epsilon, delta)-differential privacy holds for one record of that site, added or "
    "removed, against everyone who sees what the site sent, the coordinator included, whatever "
    "model, optimizer and codec the coordinator chose"
)
EXCLUSIONS = (
    "values a site declared public are outside it (training and validation losses with "
    "share.loss, the record count with share.record_count; q then reveals the count)",
    "it protects one note (record), not one patient: merge each patient's notes into one record "
    "to protect patients",
    "it holds per site: a patient seen at several sites is protected at each with that site's "
    "epsilon, and the losses compose across the sites",
    "side channels are outside it: the time a site takes to reply, and the floating-point "
    "representation of the Gaussian noise (Opacus' secure mode is not available here)",
)


def site_guarantees(run_dir: Path) -> list[dict[str, Any]]:
    """Each site's guarantee, from the ledger lines the coordinator countersigned."""
    sites = []
    for path in sorted((run_dir / LEDGER_COPIES).glob("*.jsonl")):
        lines, _ = parse_ledger(path.read_text(encoding="utf-8"))
        if not lines:
            continue
        updates, metric_lines = split_releases(lines)
        entry = (updates or lines)[-1].entry
        keys = ("client", "unit", "delta", "accountant", "sampler", "q", "sigma", "clip_norm")
        replace_one = None
        if entry["record_count_public"]:
            replace_one = dp_accounting_epsilon(history(lines), float(entry["delta"]), "pld-replace-one")
        sites.append(
            {
                **{k: entry[k] for k in keys},
                "epsilon": max(float(line.entry["epsilon"]) for line in lines),
                "rounds": len(updates),
                "metric_releases": len(metric_lines),
                "metrics_sigma": float(metric_lines[-1].entry["sigma"]) if metric_lines else None,
                "budget": entry["budget"],
                "record_count_public": entry["record_count_public"],
                "epsilon_replace_one": replace_one,
            }
        )
    return sites


def read_run_spec(run_dir: Path) -> RunSpec:
    path = run_dir / SPEC_NAME
    if not path.is_file():
        raise InputError(
            f"{run_dir} is not a run folder (no {SPEC_NAME}); run fedglm server or simulate first"
        )
    try:
        return RunSpec.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(
            f"{path}: not a run spec of this fedglm version ({str(exc).splitlines()[0]})"
        ) from None


def build_card(run_dir: Path) -> dict[str, Any]:
    fed = read_run_spec(run_dir).federation
    if fed.base is None:
        raise InputError(f"{run_dir}: its run spec names no base model folder")
    base = BaseModel.open(fed.base)
    checkpoint = released_checkpoint(run_dir)
    mask = (
        Mask.from_json(checkpoint.mask, base.shape)
        if checkpoint and checkpoint.mask
        else Mask.full(base.shape)
    )
    rows = metrics.read_rows(run_dir)
    last = rows[-1] if rows else {}
    distilled = read_report(run_dir / RELEASE_DIR, DistillReport)
    exported = read_report(run_dir / RELEASE_DIR, ExportReport)
    return {
        "model": f"{base.family.architecture} (Hugging Face transformers), fine-tuned by fedglm",
        "federation": {
            "rounds_finished": int(rows[-1]["round"]) if rows else 0,
            "rounds_planned": fed.rounds,
            "released_round": checkpoint.round if checkpoint else 0,
            "selected_by": _selected_by(fed.selection, rows),
            "uplink": fed.compression.uplink.model_dump(),
            "downlink": fed.compression.downlink.model_dump(),
            "pruning_schedule": [s.model_dump() for s in fed.pruning.schedule],
        },
        "base_model": _base_model(run_dir, base),
        "fine_tuning": _fine_tuning(fed.train),
        "architecture": {
            "configured": describe(meta_model(base.config)),
            "pruned": describe(meta_model(pruned_config(base.config, mask))),
            "student": distilled.student.model_dump(include={"parameters", "layers", "heads", "ffn_channels"})
            if distilled
            else None,
        },
        "validation": {
            "federated_last_round": {
                key: last.get(key)
                for key in ("val_loss", "val_bpb", "dp_val_loss", "dp_val_noise", "dp_sites")
            },
            "public_held_out": {
                "text": distilled.public_text,
                "teacher": distilled.teacher.model_dump(include={"loss", "bits_per_byte"}),
                "student": distilled.student.model_dump(include={"loss", "bits_per_byte"}),
            }
            if distilled
            else None,
        },
        "export": exported.model_dump(exclude_none=True) if exported else None,
        "traffic": {
            "upload_bytes": sum(int(r.get("upload_bytes", 0)) for r in rows),
            "download_bytes": sum(int(r.get("download_bytes", 0)) for r in rows),
        },
        "privacy": {
            "unit": "record (one note): neighbouring data sets differ by one record, added or removed",
            "guarantee": GUARANTEE,
            "exclusions": list(EXCLUSIONS),
            "sites": site_guarantees(run_dir),
            "dp_required": fed.require_dp,
            "post_processing": "pruning, distillation and export read only the aggregated model and "
            "public text; they spend no privacy",
        },
    }


def _render_released(fed: dict[str, Any]) -> str:
    chosen = fed.get("selected_by")
    if not chosen:
        return f"Released: the model of the last round ({fed['released_round']})."
    if chosen["best_round"] is None:
        return f"Released: the last round's model; no round reported {chosen['metric']} to select by."
    stopped = (
        f" The run stopped early, after round {fed['rounds_finished']}: {chosen['patience']} rounds "
        "without a better one."
        if fed["rounds_finished"] < fed["rounds_planned"]
        else ""
    )
    return (
        f"Released: the model of round {fed['released_round']} (round 0 is the base), the lowest "
        f"{chosen['metric']} ({_fmt(chosen['best_value'])}; a later round had to beat it by more than "
        f"{chosen['min_delta']:g}), not blindly the last.{stopped}"
    )


def _selected_by(selection: SelectionConfig | None, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """How the released round was chosen (None: the last round's model is released)."""
    if selection is None:
        return None
    best = best_round(rows, selection)
    return {
        "metric": selection.metric,
        "min_delta": selection.min_delta,
        "patience": selection.patience,
        "best_round": best.round if best else None,
        "best_value": best.value if best else None,
    }


def _base_model(run_dir: Path, base: BaseModel) -> dict[str, Any]:
    """The run's base model; its provenance from the `fedglm pretrain` manifest copied into the
    run folder, when it has one (a downloaded checkpoint has none)."""
    manifest = _json(run_dir / BASE_MANIFEST)
    if manifest is None:
        return {"path": str(base.folder), "hash": base.hash, "manifest": "none (not made by fedglm pretrain)"}
    return {
        "path": str(base.folder),
        "hash": manifest["folder_hash"],
        "public_data_only": manifest["public_data_only"],
        "inputs": manifest["inputs"],
        "steps": manifest["steps"],
        "held_out": manifest["final"],
    }


def _fine_tuning(train: TrainConfig) -> dict[str, Any]:
    if train.adapters == "full":
        return {"method": "full: every weight trained and sent"}
    return {
        "method": "lora: only adapters trained and sent, merged into the weights after the run",
        "rank": train.lora_rank,
        "alpha": train.lora_alpha,
        "targets": list(train.lora_targets) if train.lora_targets else "every projection",
        "aggregation": "A frozen (drawn from the run's seed), B trained and averaged: exact",
    }


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def render_markdown(card: dict[str, Any]) -> str:
    arch, fed, val, traffic, priv = (
        card["architecture"],
        card["federation"],
        card["validation"],
        card["traffic"],
        card["privacy"],
    )
    out = [
        "# Model card",
        "",
        card["model"],
        "",
        "## Architecture",
        "",
        "| model | parameters | layers | heads per layer | FFN channels per layer |",
        "|---|---|---|---|---|",
    ]
    for name in ("configured", "pruned", "student"):
        shape = arch[name]
        if shape:
            out.append(
                f"| {name} | {shape['parameters']:,} | {shape['layers']} | {shape['heads']} | "
                f"{shape['ffn_channels']} |"
            )
    out += [
        "",
        f"Federation: {fed['rounds_finished']} of {fed['rounds_planned']} rounds; pruning schedule "
        f"{fed['pruning_schedule'] or 'none'}; fine-tuning: {card['fine_tuning']['method']}.",
        "",
        _render_released(fed),
        "",
        *_render_base(card["base_model"]),
        "## Validation",
        "",
    ]
    fl = val["federated_last_round"]
    out.append(
        f"- Sites' last federated evaluation (where declared public): loss {_fmt(fl['val_loss'])}, "
        f"bits per byte {_fmt(fl['val_bpb'])}"
    )
    if fl.get("dp_val_loss") is not None:
        out.append(
            f"- Sites' last federated evaluation released under DP ({fl['dp_sites']} sites, mean of "
            f"per-record losses): loss {_fmt(fl['dp_val_loss'])} +- {_fmt(fl['dp_val_noise'])} (noise std)"
        )
    public = val["public_held_out"]
    if public:
        out.append(
            f"- Held-out public text ({public['text']}): teacher loss {_fmt(public['teacher']['loss'])}, "
            f"{_fmt(public['teacher']['bits_per_byte'])} bits/byte; student loss "
            f"{_fmt(public['student']['loss'])}, {_fmt(public['student']['bits_per_byte'])} bits/byte"
        )
    exported = card["export"]
    if exported:
        out += [
            "",
            "## Exported files",
            "",
            f"Served model: {exported['model']} "
            f"({exported['parameters']:,} parameters); parity passed: {exported['parity']['passed']}.",
            "",
            "| file | bytes | max abs logit diff | next-token agreement | held-out bits/byte |",
            "|---|---|---|---|---|",
        ]
        for info in exported["files"].values():
            out.append(
                f"| {info['file']} | {info['bytes']:,} | {_fmt(info.get('max_abs_logit_diff'), '.2e')} | "
                f"{_fmt(info.get('next_token_agreement'))} | {_fmt(info.get('held_out_bits_per_byte'))} |"
            )
    out += [
        "",
        "## Traffic",
        "",
        f"Upload {traffic['upload_bytes']:,} bytes, download "
        f"{traffic['download_bytes']:,} bytes over the whole run.",
        "",
        "## Privacy",
        "",
        f"Unit of privacy: {priv['unit']}. {priv['post_processing'].capitalize()}.",
        "",
    ]
    if priv["sites"]:
        out += [
            f"{priv['guarantee']}. What it does not cover:",
            "",
            *(f"- {exclusion}." for exclusion in priv["exclusions"]),
            "",
            "Epsilon is the largest the coordinator countersigned for the site; it covers the training "
            "updates and the validation metrics the site released under DP (the Gaussian mechanism "
            "with noise multiplier z, once per evaluation). Where a site's record count is public, "
            "the last column gives the same history's epsilon against replacing one record "
            "(dp-accounting PLD).",
            "",
            "| site | epsilon | delta | budget | accountant | sampler | q | sigma | clip | rounds | "
            "metric releases (z) | replace-one epsilon |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in priv["sites"]:
            metric_releases = s.get("metric_releases", 0)
            z = f" ({s['metrics_sigma']:g})" if metric_releases else ""
            out.append(
                f"| {s['client']} | {s['epsilon']:.3f} | {s['delta']:g} | {s['budget']:g} | "
                f"{s['accountant']} | {s['sampler']} | {s['q']:.4g} | {s['sigma']:.4g} | "
                f"{s['clip_norm']:g} | {s['rounds']} | {metric_releases}{z} | "
                f"{_fmt(s['epsilon_replace_one'], '.3f')} |"
            )
    else:
        out.append(
            "No site sent a countersigned ledger entry: this model carries **no** differential "
            "privacy guarantee."
        )
    return "\n".join(out) + "\n"


def _render_base(base: dict[str, Any]) -> list[str]:
    if "inputs" not in base:
        return [
            "## Base model",
            "",
            f"- {base['path']}, folder hash {base['hash']} (manifest: {base['manifest']}).",
            "",
        ]
    sources = "; ".join(
        f"{i['path']} (SHA-256 {i['sha256'][:16]}..., {i['records']:,} records)"
        if "sha256" in i
        else f"generated public notes ({i['records']:,} records)"
        for i in base["inputs"]
    )
    return [
        "## Base model",
        "",
        f"- Hash {base['hash']}; pretrained for {base['steps']} steps on public text only: {sources}.",
        f"- Held-out public text after pretraining: loss {_fmt(base['held_out']['val_loss'])}, "
        f"{_fmt(base['held_out']['val_bits_per_byte'])} bits/byte.",
        "",
    ]


def write_card(run_dir: Path) -> tuple[Path, Path]:
    card = build_card(run_dir)
    folder = run_dir / RELEASE_DIR
    atomic_write_text(folder / CARD_JSON, json.dumps(card, indent=2) + "\n")
    atomic_write_text(folder / CARD_MD, render_markdown(card))
    return folder / CARD_MD, folder / CARD_JSON
