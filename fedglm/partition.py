"""`fedglm partition`: one labelled corpus into K non-IID hospital data sets.

The corpus is read as sites read their data (`data.read_labelled`): a CSV file (a text column
and a label column), a JSONL file (a text field and a label field), or a folder of label
folders of `.txt` files (one record each; the folder's name is the label).

Duplicate texts are removed first: public corpora such as MTSamples list the same note under
several labels, which would put one note in two hospitals and in both a training and a
validation split. Each distinct text keeps one label, its rarest (the most specific, e.g. an
organ specialty over "Surgery"). Whole labels are then dealt to sites, largest first, each to
the site holding the fewest records so far: sites differ in specialty (non-IID) and are close
in size. Output: `site-1.jsonl` ... `site-K.jsonl` (fields `text`, `label`) and
`partition.json` (which labels and how many records each site got).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from fedglm.atomic import atomic_write_text
from fedglm.data import DataFormat, infer_format, read_labelled
from fedglm.errors import InputError


@dataclass(frozen=True)
class SitePart:
    path: Path
    labels: tuple[str, ...]
    records: int


def deduplicate(rows: list[tuple[str, str]]) -> dict[str, str]:
    """text -> its rarest label (ties broken by name), over rows of (text, label)."""
    label_counts = Counter(label for _, label in rows)
    labels_of: dict[str, set[str]] = defaultdict(set)
    for text, label in rows:
        labels_of[text].add(label)
    return {text: min(labels, key=lambda lab: (label_counts[lab], lab)) for text, labels in labels_of.items()}


def assign_labels(sizes: dict[str, int], sites: int) -> list[list[str]]:
    """Deal whole labels to `sites` sites: largest label first, to the smallest site."""
    groups: list[list[str]] = [[] for _ in range(sites)]
    totals = [0] * sites
    for label in sorted(sizes, key=lambda lab: (-sizes[lab], lab)):
        target = min(range(sites), key=lambda i: (totals[i], i))
        groups[target].append(label)
        totals[target] += sizes[label]
    return groups


def partition_corpus(
    path: Path,
    *,
    text_field: str,
    label_field: str,
    fmt: DataFormat | None = None,
    sites: int,
    out_dir: Path,
    min_label_records: int = 1,
) -> list[SitePart]:
    if sites < 1:
        raise InputError(f"--sites {sites}: must be at least 1")
    raw = read_labelled(path, fmt, text_field, label_field)
    rows = [(text.strip(), label.strip()) for text, label in raw if text.strip() and label.strip()]
    text_label = deduplicate(rows)
    by_label: dict[str, list[str]] = defaultdict(list)
    for text, label in text_label.items():
        by_label[label].append(text)
    by_label = {lab: texts for lab, texts in by_label.items() if len(texts) >= min_label_records}
    if len(by_label) < sites:
        raise InputError(
            f"{path}: only {len(by_label)} label(s) in '{label_field}' with at least "
            f"{min_label_records} record(s); cannot make {sites} sites"
        )
    groups = assign_labels({lab: len(t) for lab, t in by_label.items()}, sites)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    for index, labels in enumerate(groups, start=1):
        site_path = out_dir / f"site-{index}.jsonl"
        lines = [
            json.dumps({"text": text, "label": label})
            for label in sorted(labels)
            for text in sorted(by_label[label])
        ]
        atomic_write_text(site_path, "\n".join(lines) + "\n")
        parts.append(SitePart(path=site_path, labels=tuple(sorted(labels)), records=len(lines)))
    summary = {
        "source": str(path),
        "format": fmt or infer_format(path),
        "text_field": text_field,
        "label_field": label_field,
        "rows": len(raw),
        "distinct_texts": len(text_label),
        "sites": [{"file": p.path.name, "records": p.records, "labels": list(p.labels)} for p in parts],
    }
    atomic_write_text(out_dir / "partition.json", json.dumps(summary, indent=2) + "\n")
    return parts
