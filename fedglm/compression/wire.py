"""fedglm's self-describing payload: header, tensor table, codec bodies, checksum.

The byte layout is specified in `compression/FORMAT.md` at the top of the repository; this
module is its only reader and writer. Everything here reads bytes from the network, so every
field is checked before it is used, and every failure is a `PayloadError` with a short reason
code (counted in `metrics.jsonl`) and a message naming the bad value.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum

MAGIC = b"FGLM"
VERSION = 1
HASH_BYTES = 32
NO_HASH = bytes(HASH_BYTES)
DTYPE_FLOAT32 = 1
MAX_NAME_BYTES = 1024
MAX_NDIM = 8

_HEADER = struct.Struct("<4sHBBII32s32s")  # magic, version, kind, codec, round, tensors, base, target
_NAME_LEN = struct.Struct("<H")
_DIM = struct.Struct("<I")
_TENSOR_TAIL = struct.Struct("<BI")  # dtype, body length


class PayloadError(ValueError):
    """Bytes from the network that fedglm refuses; `reason` is a short code for metrics."""

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


class Kind(IntEnum):
    """What a payload carries."""

    UPDATE = 0  # a client's model change, built on the model `base`
    FULL = 1  # complete weights of the model `target`
    DELTA = 2  # the change that turns model `base` into model `target`
    INIT = (
        3  # no tensors: build the model from the base folder and the round's seed; it must hash to `target`
    )


@dataclass(frozen=True)
class Header:
    kind: Kind
    codec_id: int
    round: int
    base: bytes
    target: bytes


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    body: memoryview


@dataclass(frozen=True)
class Payload:
    header: Header
    tensors: list[TensorEntry]


def pack(header: Header, tensors: list[tuple[str, tuple[int, ...], bytes]]) -> bytes:
    """Serialize a payload: `tensors` are (name, shape, codec body) in the order to send."""
    parts = [
        _HEADER.pack(
            MAGIC,
            VERSION,
            int(header.kind),
            header.codec_id,
            header.round,
            len(tensors),
            header.base,
            header.target,
        )
    ]
    for name, shape, body in tensors:
        raw = name.encode("utf-8")
        parts.append(_NAME_LEN.pack(len(raw)) + raw + struct.pack("<B", len(shape)))
        parts.extend(_DIM.pack(d) for d in shape)
        parts.append(_TENSOR_TAIL.pack(DTYPE_FLOAT32, len(body)))
    parts.extend(body for _, _, body in tensors)
    blob = b"".join(parts)
    return blob + hashlib.sha256(blob).digest()


class _Reader:
    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.data):
            raise PayloadError(
                f"payload truncated: {what} needs {n} bytes at offset {self.pos}, "
                f"{len(self.data) - self.pos} left",
                "truncated",
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out


def read_header(blob: bytes | memoryview) -> Header:
    """The header alone, checked for magic, version and kind (no checksum, no table)."""
    data = memoryview(blob)
    if len(data) < _HEADER.size:
        raise PayloadError(
            f"payload truncated: {len(data)} bytes, the header alone is {_HEADER.size}", "truncated"
        )
    magic, version, kind, codec_id, rnd, _, base, target = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise PayloadError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}", "bad-magic")
    if version != VERSION:
        raise PayloadError(
            f"format version {version} is not supported (this build reads {VERSION})", "bad-version"
        )
    if kind not in Kind._value2member_map_:
        raise PayloadError(f"unknown payload kind {kind}", "bad-kind")
    return Header(Kind(kind), codec_id, rnd, bytes(base), bytes(target))


def unpack(blob: bytes | memoryview, shapes: Mapping[str, tuple[int, ...]], max_bytes: int) -> Payload:
    """Parse and check a payload against the model's tensor `shapes`.

    Checks, in order: total size (at most `max_bytes`, so a declared size cannot ask for more
    memory than a dense model), checksum, header, then every tensor entry (known name, no
    repeats, the model's shape, float32, a body inside the payload). Codec bodies are checked
    by their codec when decoded.
    """
    data = memoryview(blob)
    if len(data) > max_bytes:
        raise PayloadError(
            f"payload is {len(data)} bytes, more than the {max_bytes} a dense model needs", "too-large"
        )
    if len(data) < _HEADER.size + HASH_BYTES:
        raise PayloadError(f"payload truncated: {len(data)} bytes", "truncated")
    body, digest = data[:-HASH_BYTES], data[-HASH_BYTES:]
    header = read_header(body)
    if hashlib.sha256(body).digest() != bytes(digest):
        raise PayloadError("checksum mismatch: the payload was altered or truncated in transit", "checksum")
    count = _HEADER.unpack_from(body)[5]
    if count > len(shapes):
        raise PayloadError(f"payload lists {count} tensors, the model has {len(shapes)}", "too-large")
    reader = _Reader(body)
    reader.pos = _HEADER.size
    table: list[tuple[str, tuple[int, ...], int]] = []
    seen: set[str] = set()
    for _ in range(count):
        (name_len,) = _NAME_LEN.unpack(reader.take(_NAME_LEN.size, "a tensor name length"))
        if name_len > MAX_NAME_BYTES:
            raise PayloadError(f"tensor name of {name_len} bytes", "unknown-tensor")
        try:
            name = bytes(reader.take(name_len, "a tensor name")).decode("utf-8")
        except UnicodeDecodeError:
            raise PayloadError("a tensor name is not UTF-8", "unknown-tensor") from None
        if name not in shapes:
            raise PayloadError(f"tensor {name[:80]!r} is not in the model", "unknown-tensor")
        if name in seen:
            raise PayloadError(f"tensor {name!r} appears twice", "duplicate-tensor")
        seen.add(name)
        ndim = reader.take(1, "a tensor rank")[0]
        if ndim > MAX_NDIM:
            raise PayloadError(f"tensor {name}: rank {ndim}", "bad-shape")
        shape = tuple(_DIM.unpack(reader.take(_DIM.size, "a dimension"))[0] for _ in range(ndim))
        if shape != shapes[name]:
            raise PayloadError(
                f"tensor {name}: shape {list(shape)}, the model has {list(shapes[name])}", "bad-shape"
            )
        dtype, body_len = _TENSOR_TAIL.unpack(reader.take(_TENSOR_TAIL.size, "a tensor entry"))
        if dtype != DTYPE_FLOAT32:
            raise PayloadError(
                f"tensor {name}: dtype code {dtype}, expected {DTYPE_FLOAT32} (float32)", "bad-dtype"
            )
        table.append((name, shape, body_len))
    tensors = [TensorEntry(name, shape, reader.take(n, f"the body of {name}")) for name, shape, n in table]
    if reader.pos != len(body):
        raise PayloadError(
            f"{len(body) - reader.pos} unexpected bytes after the last tensor body", "trailing-bytes"
        )
    return Payload(header, tensors)
