from pathlib import Path

import pytest

from fedglm.errors import InputError
from fedglm.partition import assign_labels, deduplicate, partition_csv


def test_duplicate_texts_keep_their_rarest_label() -> None:
    rows = [("n1", "Surgery"), ("n1", "Urology"), ("n2", "Surgery"), ("n3", "Surgery")]
    assert deduplicate(rows) == {"n1": "Urology", "n2": "Surgery", "n3": "Surgery"}


def test_labels_are_dealt_whole_and_balanced() -> None:
    groups = assign_labels({"a": 50, "b": 40, "c": 30, "d": 20, "e": 5}, 2)
    assert sorted(label for group in groups for label in group) == ["a", "b", "c", "d", "e"]
    sizes = [sum({"a": 50, "b": 40, "c": 30, "d": 20, "e": 5}[x] for x in g) for g in groups]
    assert abs(sizes[0] - sizes[1]) <= 20


def test_partition_csv_writes_disjoint_sites(tmp_path: Path) -> None:
    src = tmp_path / "c.csv"
    lines = ["text,label"] + [f"note {i},L{i % 3}" for i in range(30)] + ["note 0, L1 "]
    src.write_text("\n".join(lines) + "\n")
    parts = partition_csv(src, text_column="text", label_column="label", sites=3, out_dir=tmp_path / "out")
    texts = [p.path.read_text().count("\n") for p in parts]
    assert sum(texts) == 30  # the duplicate of "note 0" is gone
    assert all(len(p.labels) == 1 for p in parts)
    assert (tmp_path / "out" / "partition.json").exists()
    with pytest.raises(InputError, match="cannot make 4 sites"):
        partition_csv(src, text_column="text", label_column="label", sites=4, out_dir=tmp_path / "o2")
