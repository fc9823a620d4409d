"""A model is a local Hugging Face folder: config.json, safetensors weights, tokenizer files.

Loading never reaches a hub and never runs code shipped with a folder: `local_files_only=True`,
`trust_remote_code=False`, and a config.json that asks for its own classes (`auto_map`) is
refused before transformers reads it. Only safetensors weights load (a pickled
`pytorch_model.bin` could run code); a sharded folder must hold every shard its index names.
transformers fills a weight missing from the files with random values and only warns; here any
missing, unexpected or mis-shaped weight is an error, so a damaged folder never trains.

The folder's hash (`folder_hash`) covers what decides the model's behaviour: config.json,
generation_config.json, the weight files and their index, and the tokenizer files. It is the
base hash the coordinator announces and a site may pin. `save_folder` writes a folder atomically
(a temporary folder renamed into place) with world-readable files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from fedglm.errors import InputError
from fedglm.models.families import Family, family_of

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
HASHED = (
    CONFIG,
    "generation_config.json",
    WEIGHTS_INDEX,
    TOKENIZER,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
MAX_JSON_BYTES = 64 * 1024 * 1024  # an index of a few thousand tensors is well below


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise InputError(f"{path}: {what} is over {MAX_JSON_BYTES // 2**20} MiB; not a model folder's")
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(
            f"{path.parent}: no {path.name}; a model folder holds {CONFIG}, weights and a tokenizer"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{path}: unreadable {what} ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: {what} must be a JSON object")
    return value


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files: the single file, or every shard its index names."""
    index = folder / WEIGHTS_INDEX
    if index.exists():
        weight_map = _read_json(index, "weight index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index}: no weight_map; re-save the model with save_pretrained")
        shards = sorted({str(name) for name in weight_map.values()})
        for shard in shards:
            if "/" in shard or "\\" in shard or not shard.endswith(".safetensors"):
                raise InputError(
                    f"{index}: shard name {shard[:80]!r} is not a safetensors file in the folder"
                )
            if not (folder / shard).is_file():
                raise InputError(
                    f"{folder}: weight shard {shard} named in {WEIGHTS_INDEX} is missing; "
                    "copy the whole folder"
                )
        return [folder / shard for shard in shards]
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise InputError(
            f"{folder}: weights only as pickled .bin/.pt files, which can run code when loaded; "
            "convert them to safetensors (save_pretrained(..., safe_serialization=True))"
        )
    raise InputError(f"{folder}: no {WEIGHTS} or {WEIGHTS_INDEX}; a model folder holds safetensors weights")


def check_folder(folder: Path) -> Family:
    """Check a model folder without loading it; its family. InputError names what is wrong."""
    if not folder.is_dir():
        raise InputError(f"model folder {folder} does not exist (a Hugging Face folder with {CONFIG})")
    config = _read_json(folder / CONFIG, "model config")
    if "auto_map" in config:
        raise InputError(
            f"{folder / CONFIG} asks to run code shipped with the model (auto_map); fedglm never runs a "
            "model folder's code: use a checkpoint of a class built into transformers"
        )
    family = family_of(config, str(folder / CONFIG))
    weight_files(folder)
    if not (folder / TOKENIZER).is_file():
        raise InputError(f"{folder}: no {TOKENIZER}; the model's tokenizer must be saved beside it")
    return family


def folder_hash(folder: Path) -> str:
    """SHA-256 (hex) over the names and bytes of the files that decide the model's behaviour.

    A process hashes a folder's files again only when one's size, time or inode changed: a
    site re-checks its base every round, and a 9 B checkpoint is 18 GB to read."""
    check_folder(folder)
    names = sorted(
        {name for name in HASHED if (folder / name).is_file()} | {p.name for p in weight_files(folder)}
    )
    stats = tuple((name, *_identity(folder / name)) for name in names)
    key = (str(folder.resolve()), stats)
    if key not in _HASHES:
        digest = hashlib.sha256()
        for name in names:
            digest.update(name.encode() + b"\0")
            file_digest = hashlib.sha256()
            with (folder / name).open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    file_digest.update(block)
            digest.update(file_digest.digest())
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


_HASHES: dict[tuple[str, tuple[tuple[object, ...], ...]], str] = {}


def _identity(path: Path) -> tuple[int, int, int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns, info.st_ino, info.st_ctime_ns


def check_weight_headers(folder: Path) -> None:
    """Read every weight file's header (not its tensors): a damaged or foreign file is refused
    at once, not at the first round."""
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except (OSError, SafetensorError) as exc:
            raise InputError(
                f"{path}: not a readable safetensors file ({type(exc).__name__}: {str(exc)[:80]}); "
                "copy the model folder again"
            ) from None


def load_model(folder: Path, *, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The folder's causal LM in training mode; InputError if the folder is refused or damaged."""
    family = check_folder(folder)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        model, info = AutoModelForCausalLM.from_pretrained(
            folder,
            config=config,
            local_files_only=True,
            trust_remote_code=False,
            dtype=dtype,
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        raise InputError(
            f"{folder}: cannot load the model ({type(exc).__name__}: {str(exc)[:120]})"
        ) from None
    if type(model).__name__ != family.architecture:
        raise InputError(f"{folder}: loaded {type(model).__name__}, expected {family.architecture}")
    for kind in ("missing_keys", "mismatched_keys", "unexpected_keys"):
        wrong = sorted(str(key) for key in info.get(kind, ()))
        if wrong:
            raise InputError(
                f"{folder}: weights {kind.replace('_keys', '')}: {', '.join(wrong[:3])}"
                f"{' ...' if len(wrong) > 3 else ''}; the weights do not match config.json"
            )
    return model.train()  # from_pretrained returns eval mode, where Opacus sees no activations


def load_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """The folder's tokenizer (tokenizer.json); InputError if it cannot be read."""
    if not (folder / TOKENIZER).is_file():
        raise InputError(f"{folder}: no {TOKENIZER}; the model's tokenizer must be saved beside it")
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(
            f"{folder}: cannot load the tokenizer ({type(exc).__name__}: {str(exc)[:120]})"
        ) from None
    return tokenizer


def save_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast | None, folder: Path) -> None:
    """Write `model` (and its tokenizer) as a Hugging Face folder, replacing `folder` atomically."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for path in staging.iterdir():
            path.chmod(0o644)  # save_pretrained can leave 0600: others must read what is handed out
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        staging.chmod(0o755)
        old = folder.with_name(f".{folder.name}.old")
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        staging.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
