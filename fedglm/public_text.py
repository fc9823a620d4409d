"""Public text the coordinator uses (distillation, export checks, its own evaluation): a CSV,
JSONL or .txt folder it names, or notes the project generates; never a site's records.

The split into training and held-out records is deterministic (the source's `split_seed`, or
the generator's seed), so the records the release distils on are never the ones the
coordinator evaluates on.
"""

from __future__ import annotations

from fedglm.config import PublicTextConfig
from fedglm.corpus import generate_public_records
from fedglm.data import SiteData, load_records, split_records
from fedglm.errors import InputError


def public_text(source: PublicTextConfig) -> SiteData:
    """The configured public text (or generated notes), split into training and held-out."""
    if source.data is None:
        records = generate_public_records(source.generated_records, source.seed)
        return split_records(records, 0.1, source.seed)
    records = [r for r in load_records(source.data.path, source.data.format, source.data.field) if r.strip()]
    if len(records) < 2:
        raise InputError(f"{source.data.path}: fewer than 2 non-empty records of public text")
    return split_records(records, source.data.val_fraction, source.data.split_seed)
