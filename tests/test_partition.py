import json
from pathlib import Path

import pytest

from fedglm.errors import InputError
from fedglm.partition import assign_labels, deduplicate, partition_corpus


def test_duplicate_texts_keep_their_rarest_label() -> None:
    rows = [("n1", "Surgery"), ("n1", "Urology"), ("n2", "Surgery"), ("n3", "Surgery")]
    assert deduplicate(rows) == {"n1": "Urology", "n2": "Surgery", "n3": "Surgery"}


def test_labels_are_dealt_whole_and_balanced() -> None:
    groups = assign_labels({"a": 50, "b": 40, "c": 30, "d": 20, "e": 5}, 2)
    assert sorted(label for group in groups for label in group) == ["a", "b", "c", "d", "e"]
    sizes = [sum({"a": 50, "b": 40, "c": 30, "d": 20, "e": 5}[x] for x in g) for g in groups]
    assert abs(sizes[0] - sizes[1]) <= 20


def test_a_csv_corpus_becomes_disjoint_sites(tmp_path: Path) -> None:
    src = tmp_path / "c.csv"
    lines = ["text,label"] + [f"note {i},L{i % 3}" for i in range(30)] + ["note 0, L1 "]
    src.write_text("\n".join(lines) + "\n")
    parts = partition_corpus(src, text_field="text", label_field="label", sites=3, out_dir=tmp_path / "out")
    texts = [p.path.read_text().count("\n") for p in parts]
    assert sum(texts) == 30  # the duplicate of "note 0" is gone
    assert all(len(p.labels) == 1 for p in parts)
    assert (tmp_path / "out" / "partition.json").exists()
    with pytest.raises(InputError, match="cannot make 4 sites"):
        partition_corpus(src, text_field="text", label_field="label", sites=4, out_dir=tmp_path / "o2")


def _records(part_path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in part_path.read_text().splitlines()]


def test_a_jsonl_corpus_is_read_by_its_fields_not_as_csv(tmp_path: Path) -> None:
    """The reported case: MedQuAD-like JSONL split by `source` was read as a CSV whose column
    list was the first JSON line."""
    src = tmp_path / "medquad.jsonl"
    sources = ["CancerGov", "GARD", "GHR", "MedlinePlus"]
    rows = [{"source": sources[i % 4], "question": f"q{i}", "answer": f"answer {i}"} for i in range(40)]
    src.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    parts = partition_corpus(
        src, text_field="answer", label_field="source", sites=4, out_dir=tmp_path / "out"
    )
    assert sorted(label for part in parts for label in part.labels) == sources
    for part in parts:
        records = _records(part.path)
        assert len(records) == 10 and {r["label"] for r in records} == set(part.labels)
        assert all(r["text"].startswith("answer ") for r in records)
    summary = json.loads((tmp_path / "out" / "partition.json").read_text())
    assert (summary["format"], summary["text_field"], summary["label_field"]) == ("jsonl", "answer", "source")
    with pytest.raises(
        InputError, match=r"line 1 has no field 'text' .*its fields are: source, question, answer"
    ):
        partition_corpus(src, text_field="text", label_field="source", sites=2, out_dir=tmp_path / "o2")
    src.write_text(json.dumps({"source": "GARD", "answer": 3}) + "\n")
    with pytest.raises(InputError, match="line 1: field 'answer' is int, expected text"):
        partition_corpus(src, text_field="answer", label_field="source", sites=1, out_dir=tmp_path / "o3")
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_a_folder_of_label_folders_of_txt_files(tmp_path: Path) -> None:
    corpus = tmp_path / "notes"
    for label, count in (("cardiology", 3), ("urology", 2), ("neurology", 1)):
        (corpus / label).mkdir(parents=True)
        for i in range(count):
            (corpus / label / f"{i}.txt").write_text(f"{label} note {i}")
    (corpus / "README").write_text("not a record")
    parts = partition_corpus(corpus, text_field="", label_field="", sites=2, out_dir=tmp_path / "out")
    assert [part.labels for part in parts] == [("cardiology",), ("neurology", "urology")]
    assert {r["text"] for r in _records(parts[1].path)} == {
        "urology note 0",
        "urology note 1",
        "neurology note 0",
    }
    with pytest.raises(InputError, match=r"no <label>/\*\.txt files"):
        partition_corpus(tmp_path / "out", text_field="", label_field="", sites=1, out_dir=tmp_path / "o2")
