"""Mutated payloads: `decode` returns checked values or raises PayloadError, nothing else.

Valid payloads of every codec for a small model are mutated (bytes flipped, cut, inserted or
deleted; header fields, table fields and the first fields of codec bodies overwritten) and
mostly re-signed, so that the mutation gets past the SHA-256 checksum and reaches the parser.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedglm.compression import CODECS, NO_HASH, Header, Kind, PayloadError, decode, encode
from fedglm.compression.update import Selection
from tests.compression.helpers import table_offsets

SHAPES: dict[str, tuple[int, ...]] = {"a.weight": (8, 8), "b.bias": (5,), "c": (3, 4), "d.weight": (300,)}
N = {name: int(np.prod(shape)) for name, shape in SHAPES.items()}
HEADER_FIELDS = {
    "version": (4, "<H"),
    "kind": (6, "<B"),
    "codec": (7, "<B"),
    "round": (8, "<I"),
    "count": (12, "<I"),
}
TABLE_FIELDS = {"body_len": "<I", "dims": "<I", "rank": "<B", "name_len": "<H", "dtype": "<B"}

u32s = st.one_of(
    st.sampled_from(
        [0, 1, 2, 3, 4, 5, 7, 8, 12, 16, 63, 64, 65, 255, 256, 299, 300, 301, 1024, 2**31, 2**32 - 1]
    ),
    st.integers(0, 2**32 - 1),
)


def resign(blob: bytes) -> bytes:
    return blob[:-32] + hashlib.sha256(blob[:-32]).digest() if len(blob) >= 32 else blob


@st.composite
def valid_payloads(draw: st.DrawFn) -> bytes:
    codec = draw(st.sampled_from(list(CODECS)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = {name: (rng.standard_normal(n) * 1e-3).astype(np.float32) for name, n in N.items()}
    if draw(st.booleans()):  # clustered large entries: the zstd index coder wins
        start = int(rng.integers(0, 250))
        values["d.weight"][start : start + 40] *= 1000
    if draw(st.booleans()):
        values["b.bias"][:] = 0
    present = draw(st.sets(st.sampled_from(list(SHAPES)), min_size=1))
    values = {name: v for name, v in values.items() if name in present}
    header = Header(
        draw(st.sampled_from(list(Kind))),
        CODECS[codec].codec_id,
        draw(st.integers(0, 2**32 - 1)),
        bytes(rng.integers(0, 256, 32, dtype=np.uint8)),
        draw(st.sampled_from([NO_HASH, bytes(range(32))])),
    )
    density = draw(st.sampled_from([0.02, 0.1, 0.3, 1.0]))
    selection: Selection = draw(st.sampled_from(["per-tensor", "global"]))
    return encode(values, SHAPES, CODECS[codec], header, density=density, selection=selection)


# a position, as a fraction of the length; integers are hashed (Knuth's multiplicative hash) so
# that hypothesis' preference for small integers does not pile every edit onto the header
where = st.integers(0, 2**32 - 1).map(lambda x: (x * 2654435761 % 2**32) / 2**32)
structural = st.one_of(  # hypothesis favours the first branches: the deepest edits come first
    # anywhere in a body (index codes, values, signs, scales)
    st.tuples(st.just("body-flip"), st.integers(0, 3), where, st.integers(1, 255)),
    st.tuples(st.just("body-flip"), st.integers(0, 3), where, st.sampled_from([1, 2, 4, 8, 16, 128])),
    # the first fields of a body: k, exponent / mu, index coder, index length, block size
    st.tuples(st.just("body-u32"), st.integers(0, 3), st.sampled_from([5, 0, 4, 6, 8, 9]), u32s),
    st.tuples(st.just("body-byte"), st.integers(0, 3), st.integers(0, 24), st.integers(0, 255)),
    st.tuples(
        st.just("table-delta"), st.integers(0, 3), st.sampled_from(list(TABLE_FIELDS)), st.integers(-9, 9)
    ),
    st.tuples(st.just("table"), st.integers(0, 3), st.sampled_from(list(TABLE_FIELDS)), u32s),
    st.tuples(st.just("header"), st.sampled_from(list(HEADER_FIELDS)), u32s),
)
byte_level = st.one_of(
    st.tuples(st.just("flip"), where, st.integers(1, 255)),
    st.tuples(st.just("truncate"), where),
    st.tuples(st.just("insert"), where, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), where, st.integers(1, 16)),
)


def _put(blob: bytearray, offset: int, fmt: str, value: int) -> None:
    size = struct.calcsize(fmt)
    if offset >= 0 and offset + size <= len(blob):
        struct.pack_into(fmt, blob, offset, value % (1 << (8 * size)))


def _get(blob: bytearray, offset: int, fmt: str) -> int:
    if offset >= 0 and offset + struct.calcsize(fmt) <= len(blob):
        value: int = struct.unpack_from(fmt, blob, offset)[0]
        return value
    return 0


def mutate(blob: bytes, mutations: list[tuple[Any, ...]]) -> bytes:
    entries = table_offsets(blob)
    out = bytearray(blob)
    # structural edits first, at the offsets of the valid payload; then byte-level edits
    for m in sorted(mutations, key=lambda m: m[0] in {"flip", "truncate", "insert", "delete"}):
        kind = m[0]
        if kind == "header":
            offset, fmt = HEADER_FIELDS[m[1]]
            _put(out, offset, fmt, m[2])
        elif kind in {"table", "table-delta"} and entries:
            entry, fmt = entries[m[1] % len(entries)], TABLE_FIELDS[m[2]]
            value = m[3] if kind == "table" else _get(out, entry[m[2]], fmt) + m[3]
            _put(out, entry[m[2]], fmt, value)
        elif kind == "body-u32" and entries:
            _put(out, entries[m[1] % len(entries)]["body"] + m[2], "<I", m[3])
        elif kind == "body-byte" and entries:
            _put(out, entries[m[1] % len(entries)]["body"] + m[2], "<B", m[3])
        elif kind == "body-flip" and entries:
            entry = entries[m[1] % len(entries)]
            at = entry["body"] + int(m[2] * entry["length"])
            if entry["length"]:
                _put(out, at, "<B", _get(out, at, "<B") ^ m[3])
        elif kind == "flip" and out:
            out[int(m[1] * len(out))] ^= m[2]
        elif kind == "truncate":
            del out[int(m[1] * len(out)) :]
        elif kind == "insert":
            at = int(m[1] * (len(out) + 1))
            out[at:at] = m[2]
        elif kind == "delete" and out:
            at = int(m[1] * len(out))
            del out[at : at + m[2]]
    return bytes(out)


def check_decoded(blob: bytes) -> bool:
    """Decode; True if accepted (and everything returned is sane), False if refused."""
    try:
        header, decoded = decode(blob, SHAPES)
    except PayloadError as exc:
        assert isinstance(exc.reason, str) and exc.reason
        return False
    assert isinstance(header.kind, Kind)
    assert len(header.base) == len(header.target) == 32
    for name, d in decoded.items():
        assert name in SHAPES
        n = N[name]
        assert d.values.dtype == np.float32
        assert np.isfinite(d.values).all()
        if d.positions is None:
            assert d.values.shape == (n,)
        else:
            p = d.positions
            assert p.dtype == np.int64 and d.values.shape == p.shape and p.size <= n
            assert (np.diff(p) > 0).all()
            assert p.size == 0 or (p[0] >= 0 and p[-1] < n)
        assert d.dense(n).shape == (n,)
    return True


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    blob=valid_payloads(),
    mutations=st.lists(st.one_of(structural, structural, byte_level), min_size=1, max_size=4),
    sign=st.sampled_from([True, True, True, False]),
)
def test_mutated_payloads_decode_or_raise_payload_error(
    blob: bytes, mutations: list[tuple[Any, ...]], sign: bool
) -> None:
    assert check_decoded(blob)  # the unmutated payload is valid
    mutated = mutate(blob, mutations)
    if sign:
        mutated = resign(mutated)
    check_decoded(mutated)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(blob=valid_payloads(), cut=st.integers(0, 2**20))
def test_every_truncation_is_refused(blob: bytes, cut: int) -> None:
    cut %= len(blob)
    assert not check_decoded(blob[:cut])
    assert not check_decoded(resign(blob[:cut]))
