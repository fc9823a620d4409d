import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedglm.data import (
    IGNORE_INDEX,
    PAD_INPUT,
    eval_windows,
    load_records,
    sample_batches,
    split_records,
    text_bytes,
)
from fedglm.errors import InputError
from fedglm.models.tokenizer import encode_record, encode_records
from tests.bases import tokenizer


def encode(text: str) -> list[int]:
    return encode_record(tokenizer(), text)


def test_csv_jsonl_and_txt_folder(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text('id,note\n1,"first, note"\n2,\n3,third\n')
    assert load_records(tmp_path / "a.csv", field="note") == ["first, note", "third"]
    (tmp_path / "a.jsonl").write_text(json.dumps({"t": "x"}) + "\n\n" + json.dumps({"t": "y"}) + "\n")
    assert load_records(tmp_path / "a.jsonl", field="t") == ["x", "y"]
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "b.txt").write_text("bee")
    (folder / "a.txt").write_text("ay")
    assert load_records(folder) == ["ay", "bee"]


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "message"),
    [
        ("missing.csv", None, {"field": "x"}, "does not exist"),
        ("a.csv", b"id,note\n1,a\n", {"field": "text"}, "no column 'text'.*columns are: id, note"),
        (
            "a.csv",
            b"note\n\xff\xfe bad\n",
            {"field": "note"},
            r"not valid UTF-8 at byte 5 \(line 2\)",
        ),
        ("a.jsonl", b'{"t": "x"}\nnot json\n', {"field": "t"}, "line 2 is not valid JSON"),
        ("a.jsonl", b'{"u": "x"}\n', {"field": "t"}, "line 1 has no field 't'"),
        ("a.jsonl", b'{"t": 5}\n', {"field": "t"}, "field 't' is int"),
        ("a.csv", b"note\n", {"field": "note"}, "no non-empty records"),
        ("a.parquet", b"", {"field": "t"}, "cannot tell the format"),
        ("a.csv", b"note\n1\n", {}, "data.field is required"),
    ],
)
def test_bad_data_gives_one_clear_line(
    tmp_path: Path, name: str, content: bytes | None, kwargs: dict, message: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=message) as err:
        load_records(path, **kwargs)
    assert "\n" not in str(err.value)


def test_split_is_by_record_and_independent_of_order() -> None:
    records = [f"note {i}" for i in range(200)]
    a = split_records(records, 0.2, seed=1)
    b = split_records(list(reversed(records)), 0.2, seed=1)
    assert set(a.val) == set(b.val) and set(a.train) == set(b.train)
    assert not set(a.val) & set(a.train)
    assert 20 < len(a.val) < 60
    assert set(split_records(records, 0.2, seed=2).val) != set(a.val)


def test_split_keeps_one_validation_record_and_refuses_too_few() -> None:
    assert len(split_records(["a", "b"], 0.01, seed=0).val) == 1
    with pytest.raises(InputError, match="too few"):
        split_records(["only"], 0.999999, seed=0)


def test_records_are_framed_by_bos_and_eos_and_round_trip() -> None:
    tok = tokenizer()
    for text in ("é", "Patient reports chest pain; BP 140/90.", "", "日本語 ✓"):
        tokens = encode(text)
        assert tokens[0] == tok.bos_token_id and tokens[-1] == tok.eos_token_id
        assert tok.decode(tokens[1:-1]) == text  # byte level: no unknown token, whatever the script
    texts = ["first note", "é", ""]
    assert encode_records(tok, texts) == [encode(t) for t in texts]


def test_bits_per_byte_count_utf8_bytes_not_tokens() -> None:
    assert text_bytes(["é", "ab", ""]) == 4


@settings(max_examples=30, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=60), min_size=1, max_size=12), st.integers(1, 8))
def test_batches_hold_distinct_records_and_real_windows(texts: list[str], batch_size: int) -> None:
    records = [encode(t) for t in texts]
    inputs, targets = next(
        sample_batches(records, batch_size=batch_size, seq_len=16, generator=torch.Generator().manual_seed(0))
    )
    assert inputs.shape == targets.shape == (min(batch_size, len(records)), 16)
    for row in range(inputs.shape[0]):
        valid = targets[row] != IGNORE_INDEX
        n = int(valid.sum())
        # Targets are the inputs shifted by one, inside one record.
        assert torch.equal(inputs[row, 1:n], targets[row, : n - 1])
        assert valid[:n].all() and not valid[n:].any()
        assert (inputs[row, n:] == PAD_INPUT).all()  # past the record's end: padding, not predicted


def test_eval_windows_predict_every_token_once() -> None:
    records = [encode("a" * 40), encode("bc")]
    assert len(records[0]) > 2 * 16  # the long record spans several windows
    total = sum(int((t != IGNORE_INDEX).sum()) for _, t in eval_windows(records, seq_len=16, batch_size=2))
    assert total == sum(len(r) - 1 for r in records)
