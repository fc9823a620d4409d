"""The payload format: golden vectors byte for byte, the header layout, and every rejection."""

from __future__ import annotations

import hashlib
import json
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedglm.compression import (
    CODECS,
    NO_HASH,
    Header,
    Kind,
    PayloadError,
    check_header,
    decode,
    encode,
    model_hash,
)
from fedglm.compression.indices import GAPS_ZSTD, _gaps_encode, encode_positions
from fedglm.compression.update import payload_limit
from fedglm.compression.wire import pack
from tests.compression import make_vectors
from tests.compression.helpers import HEADER_SIZE, table_offsets

VECTORS = make_vectors.VECTOR_DIR
MANIFEST = json.loads((VECTORS / "manifest.json").read_text())
SHAPES: dict[str, tuple[int, ...]] = {name: tuple(s) for name, s in MANIFEST["shapes"].items()}
N = {name: int(np.prod(shape)) for name, shape in SHAPES.items()}
BASE = hashlib.sha256(b"base model").digest()


def resign(blob: bytes) -> bytes:
    """The payload with its trailing SHA-256 recomputed (so the checksum check passes)."""
    return blob[:-32] + hashlib.sha256(blob[:-32]).digest()


def rejection(blob: bytes, shapes: dict[str, tuple[int, ...]] = SHAPES) -> str:
    with pytest.raises(PayloadError) as info:
        decode(blob, shapes)
    return info.value.reason


def values(seed: int = 0, scale: float = 1e-3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(n) * scale).astype(np.float32) for name, n in N.items()}


def payload(codec: str = "dense", *, kind: Kind = Kind.UPDATE, round: int = 3, density: float = 1.0) -> bytes:
    header = Header(kind, CODECS[codec].codec_id, round, BASE, NO_HASH)
    return encode(values(), SHAPES, CODECS[codec], header, density=density)


# --- golden vectors ------------------------------------------------------------------------


def _vector_ids() -> list[str]:
    return [v["name"] for v in MANIFEST["vectors"]]


def _vector(name: str) -> tuple[dict[str, Any], bytes, dict[str, np.ndarray]]:
    spec = next(v for v in MANIFEST["vectors"] if v["name"] == name)
    blob = (VECTORS / spec["payload"]).read_bytes()
    with np.load(VECTORS / spec["arrays"]) as archive:
        arrays = {key: archive[key] for key in archive.files}
    return spec, blob, arrays


def test_vectors_are_present_and_small() -> None:
    names = _vector_ids()
    assert len(names) >= 6
    files = {p.name for p in VECTORS.iterdir()}
    for spec in MANIFEST["vectors"]:
        assert {spec["payload"], spec["arrays"]} <= files
    total = sum(p.stat().st_size for p in VECTORS.iterdir())
    assert total < 100_000
    kinds = {v["kind"] for v in MANIFEST["vectors"]}
    assert kinds == {"UPDATE", "DELTA", "FULL", "INIT"}
    assert set(CODECS) <= {v["codec"] for v in MANIFEST["vectors"]}
    topk_coders = {c for v in MANIFEST["vectors"] if v["codec"] == "topk" for c in v["index_coders"].values()}
    assert topk_coders == {"elias-fano", "zstd"}


@pytest.mark.parametrize("name", _vector_ids())
def test_vector_decodes_to_the_stored_values(name: str) -> None:
    spec, blob, arrays = _vector(name)
    header, decoded = decode(blob, SHAPES)
    assert header == Header(
        Kind[spec["kind"]],
        CODECS[spec["codec"]].codec_id,
        spec["round"],
        bytes.fromhex(spec["base"]),
        bytes.fromhex(spec["target"]),
    )
    assert list(decoded) == spec["tensors"]
    assert {k.split("/", 1)[1] for k in arrays if k.startswith("decoded/")} == set(spec["tensors"])
    for tensor, d in decoded.items():
        expected = arrays[f"decoded/{tensor}"]
        assert expected.dtype == np.float32 and expected.shape == SHAPES[tensor]
        got = d.dense(N[tensor]).reshape(SHAPES[tensor])
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    check_header(header, kind=Kind[spec["kind"]], round=spec["round"], base=bytes.fromhex(spec["base"]))


@pytest.mark.parametrize("name", _vector_ids())
def test_vector_re_encodes_byte_for_byte(name: str) -> None:
    spec, blob, arrays = _vector(name)
    # encode in the model's order (the manifest's shapes), which is the order of the table
    inputs = {name: arrays[f"input/{name}"].copy() for name in SHAPES if f"input/{name}" in arrays}
    assert len(inputs) == sum(k.startswith("input/") for k in arrays)
    header = Header(
        Kind[spec["kind"]],
        CODECS[spec["codec"]].codec_id,
        spec["round"],
        bytes.fromhex(spec["base"]),
        bytes.fromhex(spec["target"]),
    )
    again = encode(
        inputs, SHAPES, CODECS[spec["codec"]], header, density=spec["density"], selection=spec["selection"]
    )
    assert again == blob


def test_full_vector_target_is_the_model_hash() -> None:
    spec, _, arrays = _vector("full-dense")
    state = {name: torch.from_numpy(arrays[f"decoded/{name}"].copy()) for name in SHAPES}
    assert model_hash(state).hex() == spec["target"]


def test_generator_reproduces_the_stored_files() -> None:
    files = make_vectors.build()
    stored = {p.name for p in VECTORS.iterdir() if p.name != "README.md"}
    assert set(files) == stored
    for name, data in files.items():
        assert (VECTORS / name).read_bytes() == data, f"{name} differs from what make_vectors writes"


# --- layout --------------------------------------------------------------------------------


def test_header_and_table_layout() -> None:
    target = bytes(range(32))
    body = b"\x01\x02\x03\x04"
    blob = pack(Header(Kind.DELTA, 2, 0x01020304, BASE, target), [("ab", (2, 3), body)])
    expected = b"FGLM" + struct.pack("<HBBII", 1, 2, 2, 0x01020304, 1) + BASE + target
    assert len(expected) == HEADER_SIZE
    expected += struct.pack("<H", 2) + b"ab" + bytes([2]) + struct.pack("<II", 2, 3) + bytes([1])
    expected += struct.pack("<I", 4) + body
    assert blob == expected + hashlib.sha256(expected).digest()


def test_model_hash_follows_the_format() -> None:
    state = {"w": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([0.5])}
    digest = hashlib.sha256()
    digest.update(b"w" + b"(1, 2)" + np.array([1.0, 2.0], "<f4").tobytes())
    digest.update(b"b" + b"(1,)" + np.array([0.5], "<f4").tobytes())
    assert model_hash(state) == digest.digest()


def test_empty_sparse_tensors_are_left_out() -> None:
    update = values()
    update["norm.weight"][:] = 0
    blob = encode(update, SHAPES, CODECS["topk"], Header(Kind.UPDATE, 2, 1, BASE, NO_HASH), density=0.1)
    _, decoded = decode(blob, SHAPES)
    assert set(decoded) == {"embed.weight", "blocks.0.attn.q.weight"}


# --- rejections ----------------------------------------------------------------------------


def test_truncated() -> None:
    blob = payload()
    assert rejection(blob[:50]) == "truncated"
    assert rejection(blob[: HEADER_SIZE + 31]) == "truncated"
    assert rejection(b"") == "truncated"
    # a whole payload missing the last byte of its last body, checksum recomputed
    assert rejection(resign(blob[:-33] + blob[-32:])) == "truncated"
    # the table itself cut short
    assert rejection(resign(blob[: HEADER_SIZE + 5] + bytes(32))) == "truncated"


def test_trailing_bytes() -> None:
    blob = payload()
    assert rejection(resign(blob[:-32] + b"\x00" + blob[-32:])) == "trailing-bytes"


def test_bad_magic() -> None:
    blob = payload()
    assert rejection(resign(b"XGLM" + blob[4:])) == "bad-magic"
    assert rejection(b"XGLM" + blob[4:]) == "bad-magic"  # checked before the checksum


@pytest.mark.parametrize("version", [0, 2, 0xFFFF])
def test_bad_version(version: int) -> None:
    blob = bytearray(payload())
    struct.pack_into("<H", blob, 4, version)
    assert rejection(resign(bytes(blob))) == "bad-version"


@pytest.mark.parametrize("kind", [4, 255])
def test_bad_kind(kind: int) -> None:
    blob = bytearray(payload())
    blob[6] = kind
    assert rejection(resign(bytes(blob))) == "bad-kind"


def test_bad_checksum() -> None:
    blob = bytearray(payload())
    blob[HEADER_SIZE + 40] ^= 0x01
    assert rejection(bytes(blob)) == "checksum"
    blob = bytearray(payload())
    blob[-1] ^= 0x80
    assert rejection(bytes(blob)) == "checksum"
    blob = bytearray(payload())
    blob[8] ^= 0x01  # the round: a header field covered by the checksum
    assert rejection(bytes(blob)) == "checksum"


def test_unknown_tensor() -> None:
    shapes = {**SHAPES, "extra.weight": (4,)}
    update = {**values(), "extra.weight": np.ones(4, dtype=np.float32)}
    blob = encode(update, shapes, CODECS["dense"], Header(Kind.UPDATE, 0, 3, BASE, NO_HASH))
    assert rejection(blob, {**SHAPES, "other": (1,)}) == "unknown-tensor"
    # a name that is not UTF-8, and one longer than 1024 bytes
    offsets = table_offsets(payload())
    edited = bytearray(payload())
    edited[offsets[0]["name"]] = 0xFF
    assert rejection(resign(bytes(edited))) == "unknown-tensor"
    long_name = pack(Header(Kind.UPDATE, 0, 3, BASE, NO_HASH), [("x" * 1025, (4,), bytes(16))])
    assert rejection(long_name, {**SHAPES, "x" * 1025: (4,)}) == "unknown-tensor"


def test_wrong_shape() -> None:
    shapes = {**SHAPES, "norm.weight": (4, 4)}
    blob = encode(values(), shapes, CODECS["dense"], Header(Kind.UPDATE, 0, 3, BASE, NO_HASH))
    assert rejection(blob) == "bad-shape"
    # a declared shape bigger than the model's (the body still holds the model's size)
    edited = bytearray(payload())
    first = table_offsets(bytes(edited))[0]
    struct.pack_into("<I", edited, first["dims"], 1 << 20)
    assert rejection(resign(bytes(edited))) == "bad-shape"
    # rank above 8
    edited = bytearray(payload())
    edited[first["rank"]] = 9
    assert rejection(resign(bytes(edited))) == "bad-shape"


def test_bad_dtype() -> None:
    blob = bytearray(payload())
    blob[table_offsets(bytes(blob))[1]["dtype"]] = 2
    assert rejection(resign(bytes(blob))) == "bad-dtype"


def test_duplicate_tensor() -> None:
    body = np.zeros(16, dtype="<f4").tobytes()
    header = Header(Kind.UPDATE, 0, 3, BASE, NO_HASH)
    blob = pack(header, [("norm.weight", (16,), body), ("norm.weight", (16,), body)])
    assert rejection(blob) == "duplicate-tensor"


def test_more_tensors_than_the_model_has() -> None:
    body = np.zeros(16, dtype="<f4").tobytes()
    header = Header(Kind.UPDATE, 0, 3, BASE, NO_HASH)
    blob = pack(header, [("norm.weight", (16,), body)] * 4)
    assert rejection(blob) == "too-large"
    edited = bytearray(payload())
    struct.pack_into("<I", edited, 12, 0xFFFFFFFF)
    assert rejection(resign(bytes(edited))) == "too-large"


@pytest.mark.parametrize("codec_id", [5, 9, 255])
def test_unknown_codec(codec_id: int) -> None:
    blob = bytearray(payload())
    blob[7] = codec_id
    assert rejection(resign(bytes(blob))) == "unknown-codec"


def test_payload_larger_than_a_dense_model() -> None:
    limit = payload_limit(SHAPES)
    assert limit == 4 * sum(N.values()) + len(SHAPES) * (1024 + 64) + 4096
    assert rejection(b"\x00" * (limit + 1)) == "too-large"
    assert rejection(payload()[:80] + b"\x00" * (10 * limit)) == "too-large"
    assert rejection(b"\x00" * limit) == "bad-magic"  # at the limit the size check passes
    # a body longer than its tensor (a dense body for a 4x bigger tensor)
    header = Header(Kind.UPDATE, 0, 3, BASE, NO_HASH)
    assert rejection(pack(header, [("norm.weight", (16,), bytes(4 * 64))])) == "trailing-bytes"


def test_sparse_count_above_n() -> None:
    body = struct.pack("<Ib", N["norm.weight"] + 1, 0) + encode_positions(np.arange(3), 16) + bytes(6)
    blob = pack(Header(Kind.UPDATE, 2, 3, BASE, NO_HASH), [("norm.weight", (16,), body)])
    assert rejection(blob) == "too-large"


def test_index_out_of_range() -> None:
    n = N["norm.weight"]
    code = _gaps_encode(np.array([3, n]))
    index = struct.pack("<BI", GAPS_ZSTD, len(code)) + code
    body = struct.pack("<Ib", 2, 0) + index + np.array([1, 1], "<f2").tobytes()
    blob = pack(Header(Kind.UPDATE, 2, 3, BASE, NO_HASH), [("norm.weight", (16,), body)])
    assert rejection(blob) == "index-out-of-range"


def test_bad_index_block() -> None:
    body = struct.pack("<Ib", 2, 0) + struct.pack("<BI", 7, 2) + b"\x03\x09" + bytes(4)
    blob = pack(Header(Kind.UPDATE, 2, 3, BASE, NO_HASH), [("norm.weight", (16,), body)])
    assert rejection(blob) == "bad-indices"


def test_sparse_body_length_must_match_k() -> None:
    index = encode_positions(np.array([1, 5]), 16)
    header = Header(Kind.UPDATE, 2, 3, BASE, NO_HASH)
    good = struct.pack("<Ib", 2, 0) + index + np.array([1, -1], "<f2").tobytes()
    decode(pack(header, [("norm.weight", (16,), good)]), SHAPES)
    assert rejection(pack(header, [("norm.weight", (16,), good[:-1])])) == "truncated"
    assert rejection(pack(header, [("norm.weight", (16,), good + b"\x00")])) == "trailing-bytes"
    assert rejection(pack(header, [("norm.weight", (16,), good[:3])])) == "truncated"


def one_tensor(codec: str, body: bytes, name: str = "norm.weight") -> bytes:
    header = Header(Kind.UPDATE, CODECS[codec].codec_id, 3, BASE, NO_HASH)
    return pack(header, [(name, SHAPES[name], body)])


def test_non_finite_values() -> None:
    halves = np.ones(16, "<f2")
    halves[5] = np.nan
    assert rejection(one_tensor("fp16", b"\x00" + halves.tobytes())) == "non-finite"
    halves[5] = np.inf
    assert rejection(one_tensor("fp16", b"\x00" + halves.tobytes())) == "non-finite"
    # finite halves that overflow float32 with their exponent
    big = struct.pack("<b", 127) + np.full(16, 60000, "<f2").tobytes()
    assert rejection(one_tensor("fp16", big)) == "non-finite"
    index = encode_positions(np.array([1, 5]), 16)
    topk = struct.pack("<Ib", 2, 0) + index + np.array([1, np.nan], "<f2").tobytes()
    assert rejection(one_tensor("topk", topk)) == "non-finite"
    dense = np.ones(16, "<f4")
    dense[0] = np.inf
    assert rejection(one_tensor("dense", dense.tobytes())) == "non-finite"
    dense[0] = np.nan
    assert rejection(one_tensor("dense", dense.tobytes())) == "non-finite"
    for mu in (float("nan"), float("inf"), -1.0):
        assert rejection(one_tensor("ternary", struct.pack("<If", 2, mu) + index + b"\x00")) == "non-finite"
    for scale in (float("nan"), float("inf"), -1.0):
        assert rejection(one_tensor("int8", struct.pack("<If", 1024, scale) + bytes(16))) == "non-finite"
    # finite scale and level whose product overflows
    int8 = struct.pack("<If", 1024, 3e38) + np.full(16, 127, np.int8).tobytes()
    with np.errstate(over="ignore"):
        assert rejection(one_tensor("int8", int8)) == "non-finite"


def test_bad_bodies() -> None:
    index = encode_positions(np.array([1, 5]), 16)
    ternary = struct.pack("<If", 2, 1.0) + index + b"\x04"  # sign padding bit 2 set
    header = Header(Kind.UPDATE, 3, 3, BASE, NO_HASH)
    assert rejection(pack(header, [("norm.weight", (16,), ternary)])) == "bad-body"
    header = Header(Kind.UPDATE, 4, 3, BASE, NO_HASH)
    levels = np.zeros(16, np.int8)
    levels[3] = -128
    int8 = struct.pack("<If", 1024, 1.0) + levels.tobytes()
    assert rejection(pack(header, [("norm.weight", (16,), int8)])) == "bad-body"
    for block in (0, (1 << 20) + 1):
        int8 = struct.pack("<If", block, 1.0) + bytes(16)
        assert rejection(pack(header, [("norm.weight", (16,), int8)])) == "bad-body"


def test_check_header() -> None:
    header, _ = decode(payload("topk", round=5, density=0.1), SHAPES)
    check_header(header, kind=Kind.UPDATE, round=5, base=BASE)
    check_header(header, kind=Kind.UPDATE)
    with pytest.raises(PayloadError) as info:
        check_header(header, kind=Kind.UPDATE, round=5, base=hashlib.sha256(b"other").digest())
    assert info.value.reason == "stale-base"
    with pytest.raises(PayloadError) as info:
        check_header(header, kind=Kind.UPDATE, round=6, base=BASE)
    assert info.value.reason == "wrong-round"
    with pytest.raises(PayloadError) as info:
        check_header(header, kind=Kind.DELTA, round=5, base=BASE)
    assert info.value.reason == "bad-kind"


def test_zstd_bomb_in_a_payload_costs_no_memory() -> None:
    frame = struct.pack("<IBQ", 0xFD2FB528, 0xE0, 512 << 17)
    for i in range(512):
        frame += (((1 << 17) << 3) | (1 << 1) | int(i == 511)).to_bytes(3, "little") + b"\x00"
    body = struct.pack("<Ib", 1, 0) + struct.pack("<BI", GAPS_ZSTD, len(frame)) + frame + bytes(2)
    blob = pack(Header(Kind.UPDATE, 2, 3, BASE, NO_HASH), [("norm.weight", (16,), body)])
    assert len(blob) < payload_limit(SHAPES)
    tracemalloc.start()
    try:
        assert rejection(blob) == "bad-indices"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"decoding a {len(blob)}-byte payload allocated {peak} bytes"


def test_zstd_frame_declaring_a_huge_size_is_a_payload_error() -> None:
    frame = struct.pack("<IBQ", 0xFD2FB528, 0xE0, 1 << 62) + ((4 << 3) | (1 << 1) | 1).to_bytes(3, "little")
    body = (
        struct.pack("<Ib", 1, 0) + struct.pack("<BI", GAPS_ZSTD, len(frame) + 1) + frame + b"\x00" + bytes(2)
    )
    blob = pack(Header(Kind.UPDATE, 2, 3, BASE, NO_HASH), [("norm.weight", (16,), body)])
    assert len(blob) < 200
    assert rejection(blob) == "bad-indices"


def test_vector_dir_is_the_repository_folder() -> None:
    assert Path(__file__).resolve().parents[2] / "compression" / "vectors" == VECTORS
