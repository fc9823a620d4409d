"""A site's records: reading them, splitting them, and turning their tokens into batches.

A *record* is one patient note or one document. It is the unit of sampling (and, with DP, the
unit of privacy): a training example is one window of one record, and a batch never holds two
windows of the same record. The train / validation split is by record and deterministic: a
record's side depends only on its text and the split seed, not on file order.

Sources: a CSV column, a JSONL field, or a folder of `.txt` files (one record each), all UTF-8.
Records are tokenised by the model folder's tokenizer (`fedglm/models/tokenizer.py`), framed by
BOS and EOS. Past a record's end, input positions hold `PAD_INPUT` and their targets are
ignored: attention is causal, so what a padded position holds never reaches a real one.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from fedglm.errors import InputError

IGNORE_INDEX = -100
PAD_INPUT = 0  # any valid token id: see the module docstring
DataFormat = Literal["csv", "jsonl", "txt"]


def infer_format(path: Path) -> DataFormat:
    if path.is_dir():
        return "txt"
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    raise InputError(
        f"data.path {path}: cannot tell the format from the name; set data.format to csv, jsonl "
        "or txt (a folder of .txt files)"
    )


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(
            f"{path}: not valid UTF-8 at byte {exc.start} (line {line}); re-encode the file as UTF-8"
        ) from None


def load_records(path: Path, fmt: DataFormat | None = None, field: str | None = None) -> list[str]:
    """Read the non-empty records of a CSV column, a JSONL field or a folder of .txt files."""
    if not path.exists():
        raise InputError(f"data.path {path} does not exist; point it at the site's CSV, JSONL or folder")
    fmt = fmt or infer_format(path)
    if fmt in ("csv", "jsonl") and not field:
        raise InputError(f"data.field is required for {fmt} data ({path}): name the text column")
    if fmt == "txt":
        records = _read_txt_folder(path)
    elif fmt == "csv":
        assert field is not None
        records = _read_csv(path, field)
    else:
        assert field is not None
        records = _read_jsonl(path, field)
    records = [r for r in records if r.strip()]
    if not records:
        raise InputError(f"{path}: no non-empty records found")
    return records


def _read_txt_folder(path: Path) -> list[str]:
    if not path.is_dir():
        raise InputError(f"data.path {path}: format txt needs a folder of .txt files")
    files = sorted(path.glob("*.txt"))
    if not files:
        raise InputError(f"data.path {path}: the folder holds no .txt files")
    return [_read_utf8(f) for f in files]


def read_csv_columns(path: Path, columns: Sequence[str], what: str = "data.field") -> list[list[str]]:
    """The values of `columns` in every row of a UTF-8 CSV file."""
    csv.field_size_limit(1 << 30)
    reader = csv.DictReader(io.StringIO(_read_utf8(path), newline=""))
    header = reader.fieldnames or []
    for column in columns:
        if column not in header:
            raise InputError(
                f"{path}: no column '{column}' ({what}); columns are: {', '.join(header) or 'none'}"
            )
    try:
        return [[row[c] or "" for c in columns] for row in reader]
    except csv.Error as exc:
        raise InputError(f"{path}: malformed CSV at line {reader.line_num}: {exc}") from None


def _read_csv(path: Path, column: str) -> list[str]:
    return [values[0] for values in read_csv_columns(path, [column])]


def _read_jsonl(path: Path, field: str) -> list[str]:
    return [values[0] for values in read_jsonl_fields(path, [field])]


def read_jsonl_fields(path: Path, fields: Sequence[str], what: str = "data.field") -> list[list[str]]:
    """The text values of `fields` on every line of a UTF-8 JSONL file (null reads as empty)."""
    rows = []
    for number, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{path}: line {number} is not a JSON object")
        row = []
        for field in fields:
            if field not in obj:
                present = ", ".join(str(key) for key in list(obj)[:12]) or "none"
                raise InputError(
                    f"{path}: line {number} has no field '{field}' ({what}); its fields are: {present}"
                )
            value = obj[field]
            if value is not None and not isinstance(value, str):
                raise InputError(
                    f"{path}: line {number}: field '{field}' is {type(value).__name__}, expected text"
                )
            row.append(value or "")
        rows.append(row)
    return rows


def read_labelled(
    path: Path, fmt: DataFormat | None, text_field: str, label_field: str
) -> list[tuple[str, str]]:
    """(text, label) pairs: a CSV's columns, a JSONL file's fields, or a folder of label
    folders of .txt files (`path/<label>/*.txt`: the folder names the label)."""
    if not path.exists():
        raise InputError(f"{path} does not exist; give a CSV file, a JSONL file or a folder of label folders")
    fmt = fmt or infer_format(path)
    what = "--text-field/--by"
    if fmt == "csv":
        rows = read_csv_columns(path, [text_field, label_field], what=what)
    elif fmt == "jsonl":
        rows = read_jsonl_fields(path, [text_field, label_field], what=what)
    else:
        if not path.is_dir():
            raise InputError(f"{path}: format txt needs a folder of label folders of .txt files")
        folders = sorted(folder for folder in path.iterdir() if folder.is_dir())
        rows = [
            [_read_utf8(file), folder.name] for folder in folders for file in sorted(folder.glob("*.txt"))
        ]
        if not rows:
            raise InputError(
                f"{path}: no <label>/*.txt files; put each label's .txt files in a folder of its name"
            )
    return [(text, label) for text, label in rows]


@dataclass(frozen=True)
class SiteData:
    train: list[str]
    val: list[str]
    # True when no record fell into validation by its hash and one was moved there: then adding
    # a record can move another between the splits, which the DP metric release does not allow.
    forced_val: bool = False


def split_records(records: Sequence[str], val_fraction: float, seed: int) -> SiteData:
    """Split by record, deterministically from each record's text and `seed`."""
    train: list[str] = []
    val: list[str] = []
    for text in records:
        digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
        draw = int.from_bytes(digest[:8], "big") / 2**64
        (val if draw < val_fraction else train).append(text)
    forced = not val and len(train) > 1
    if forced:
        val.append(train.pop())
    if not train:
        raise InputError(
            f"only {len(records)} record(s): too few to keep any for training; add records "
            "or lower data.val_fraction"
        )
    return SiteData(train=train, val=val, forced_val=forced)


def text_bytes(texts: Sequence[str]) -> int:
    """UTF-8 bytes of `texts`: what bits per byte divides by, whatever the tokenizer."""
    return sum(len(text.encode("utf-8")) for text in texts)


def sample_batches(
    records: Sequence[list[int]], *, batch_size: int, seq_len: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (inputs, targets) batches: each row a random window of a distinct record.

    Records are drawn without replacement within a batch, so one record never gives two
    examples to a batch. Short records are padded; padded targets are IGNORE_INDEX.
    """
    rows = min(batch_size, len(records))
    while True:
        picks = torch.randperm(len(records), generator=generator)[:rows].tolist()
        yield window_batch(records, picks, seq_len=seq_len, generator=generator)


def window_batch(
    records: Sequence[list[int]], picks: Sequence[int], *, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets): one row per picked record, a random window of it (padded if short)."""
    inputs = torch.full((len(picks), seq_len), PAD_INPUT, dtype=torch.long)
    targets = torch.full((len(picks), seq_len), IGNORE_INDEX, dtype=torch.long)
    for row, index in enumerate(picks):
        tokens = records[index]
        span = len(tokens) - 1
        start = 0
        if span > seq_len:
            start = int(torch.randint(0, span - seq_len + 1, (1,), generator=generator))
        window = torch.tensor(tokens[start : start + seq_len + 1], dtype=torch.long)
        n = window.numel() - 1
        inputs[row, :n] = window[:-1]
        targets[row, :n] = window[1:]
    return inputs, targets


def eval_windows(
    records: Sequence[list[int]], *, seq_len: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every predicted token of every record exactly once, in non-overlapping windows."""
    for inputs, targets, _ in record_windows(records, seq_len=seq_len, batch_size=batch_size):
        yield inputs, targets


def record_windows(
    records: Sequence[list[int]], *, seq_len: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """`eval_windows` with, for each row, the index of the record it belongs to."""
    windows: list[tuple[int, list[int]]] = []
    for index, tokens in enumerate(records):
        for start in range(0, len(tokens) - 1, seq_len):
            windows.append((index, tokens[start : start + seq_len + 1]))
    for first in range(0, len(windows), batch_size):
        chunk = windows[first : first + batch_size]
        inputs = torch.full((len(chunk), seq_len), PAD_INPUT, dtype=torch.long)
        targets = torch.full((len(chunk), seq_len), IGNORE_INDEX, dtype=torch.long)
        for row, (_, window) in enumerate(chunk):
            n = len(window) - 1
            inputs[row, :n] = torch.tensor(window[:-1])
            targets[row, :n] = torch.tensor(window[1:])
        yield inputs, targets, [index for index, _ in chunk]
