"""The codecs: one Protocol, five implementations, an explicit registry chosen by name.

| name      | id | body (little-endian)                                              |
|-----------|----|-------------------------------------------------------------------|
| `dense`   | 0  | n x float32                                                       |
| `fp16`    | 1  | int8 exponent e, n x float16 (value = half * 2^e)                 |
| `topk`    | 2  | uint32 k, int8 e, index block, k x float16 (value = half * 2^e)   |
| `ternary` | 3  | uint32 k, float32 mu, index block, ceil(k/8) sign bytes           |
| `int8`    | 4  | uint32 block, ceil(n/block) x float32 scale, n x int8             |

Every codec's decoded value at a position is 0 or within a factor of two of the value it
encodes, so the error-feedback residual `x - decoded` is exact in fp32 (Sterbenz) and
`decoded + residual == x` holds bit for bit:
- half-precision values carry a per-tensor power-of-two exponent chosen so that the largest
  value lands just under 2^15: no overflow to infinity, and small updates (fine-tuning steps of
  1e-5) stay in fp16's normal range instead of flushing to subnormals;
- `ternary` (Sparse Ternary Compression) sends the top-k positions, their signs and one
  magnitude mu per tensor: the mean magnitude of the k kept values (not of all n values, a
  known defect of a widely copied implementation), rounded to 8 significant bits. Positions
  whose magnitude is below mu/2 are then left out: sending them as mu would add more error
  than leaving them to the residual. Positions above 2^16 mu (possible only in extreme tails)
  also stay in the residual, which keeps the residual exact;
- `int8` rounds to the nearest of 255 levels per block of values.

Decoders check every length, count and value they read; a violation is a `PayloadError`.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from fedglm.compression.indices import decode_positions, encode_positions
from fedglm.compression.select import keep_count, top_k
from fedglm.compression.wire import PayloadError

HALF_HEADROOM = 15  # the largest value is scaled to just under 2^15 (fp16 max is 65504)
MAX_EXPONENT = 125  # keeps 2^e and 2^-e normal float32 numbers
INT8_BLOCK = 1024
MAX_INT8_BLOCK = 1 << 20
_U32 = struct.Struct("<I")
_I8 = struct.Struct("<b")
_F32 = struct.Struct("<f")


@dataclass(frozen=True)
class Decoded:
    """A decoded tensor: values at `positions`, or all n values when `positions` is None."""

    values: np.ndarray
    positions: np.ndarray | None = None

    def add_to(self, out: np.ndarray, weight: float = 1.0) -> None:
        """out += weight * self, for a flat fp32 `out`."""
        if self.positions is None:
            if weight == 1.0:
                out += self.values
            else:
                out += np.float32(weight) * self.values
        elif self.positions.size:
            out[self.positions] += np.float32(weight) * self.values

    def dense(self, n: int) -> np.ndarray:
        if self.positions is None:
            return self.values
        out = np.zeros(n, dtype=np.float32)
        out[self.positions] = self.values
        return out


class Codec(Protocol):
    name: ClassVar[str]
    codec_id: ClassVar[int]
    sparse: ClassVar[bool]

    def encode(
        self, values: np.ndarray, *, density: float, threshold: float | None = None
    ) -> tuple[bytes, Decoded]:
        """Body and decoded values for flat fp32 `values` (density and threshold: sparse codecs)."""
        ...

    def decode(self, body: memoryview, n: int) -> Decoded:
        """Decoded values of a tensor of n entries; raises PayloadError on a bad body."""
        ...


def _finite(values: np.ndarray, what: str) -> None:
    if not np.isfinite(values).all():
        raise PayloadError(f"{what} holds NaN or infinite values", "non-finite")


def _half_exponent(values: np.ndarray) -> int:
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    if peak == 0.0 or not math.isfinite(peak):
        return 0
    return max(-MAX_EXPONENT, min(MAX_EXPONENT, math.ceil(math.log2(peak)) - HALF_HEADROOM))


def _to_half(values: np.ndarray, exponent: int) -> np.ndarray:
    # Multiplying by a normal power of two is exact, like ldexp, and several times faster.
    halves: np.ndarray = (values * np.float32(2.0**-exponent)).astype("<f2")
    return halves


def _from_half(halves: np.ndarray, exponent: int) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        out: np.ndarray = halves.astype(np.float32) * np.float32(2.0**exponent)
    _finite(out, "fp16 values")
    return out


def _exact_size(body: memoryview, size: int, what: str) -> None:
    if len(body) != size:
        reason = "truncated" if len(body) < size else "trailing-bytes"
        raise PayloadError(f"{what}: body of {len(body)} bytes, {size} expected", reason)


def _count(body: memoryview, n: int, what: str) -> int:
    if len(body) < _U32.size:
        raise PayloadError(f"{what}: body truncated", "truncated")
    (k,) = _U32.unpack_from(body)
    if k > n:
        raise PayloadError(f"{what}: {k} kept values declared for a tensor of {n}", "too-large")
    return int(k)


class Dense:
    name: ClassVar[str] = "dense"
    codec_id: ClassVar[int] = 0
    sparse: ClassVar[bool] = False

    def encode(
        self, values: np.ndarray, *, density: float, threshold: float | None = None
    ) -> tuple[bytes, Decoded]:
        return values.astype("<f4").tobytes(), Decoded(values.copy())

    def decode(self, body: memoryview, n: int) -> Decoded:
        _exact_size(body, 4 * n, "dense tensor")
        values = np.frombuffer(body, dtype="<f4").astype(np.float32)
        _finite(values, "dense tensor")
        return Decoded(values)


class Fp16:
    name: ClassVar[str] = "fp16"
    codec_id: ClassVar[int] = 1
    sparse: ClassVar[bool] = False

    def encode(
        self, values: np.ndarray, *, density: float, threshold: float | None = None
    ) -> tuple[bytes, Decoded]:
        exponent = _half_exponent(values)
        halves = _to_half(values, exponent)
        return _I8.pack(exponent) + halves.tobytes(), Decoded(_from_half(halves, exponent))

    def decode(self, body: memoryview, n: int) -> Decoded:
        _exact_size(body, 1 + 2 * n, "fp16 tensor")
        (exponent,) = _I8.unpack_from(body)
        return Decoded(_from_half(np.frombuffer(body[1:], dtype="<f2"), exponent))


class TopK:
    name: ClassVar[str] = "topk"
    codec_id: ClassVar[int] = 2
    sparse: ClassVar[bool] = True

    def encode(
        self, values: np.ndarray, *, density: float, threshold: float | None = None
    ) -> tuple[bytes, Decoded]:
        positions = top_k(values, keep_count(values.size, density), threshold)
        kept = values[positions]
        exponent = _half_exponent(kept)
        halves = _to_half(kept, exponent)
        body = _U32.pack(positions.size) + _I8.pack(exponent) + encode_positions(positions, values.size)
        return body + halves.tobytes(), Decoded(_from_half(halves, exponent), positions)

    def decode(self, body: memoryview, n: int) -> Decoded:
        k = _count(body, n, "topk tensor")
        if len(body) < 5:
            raise PayloadError("topk tensor: body truncated", "truncated")
        (exponent,) = _I8.unpack_from(body, 4)
        positions, used = decode_positions(body[5:], n, k)
        _exact_size(body[5 + used :], 2 * k, "topk values")
        return Decoded(_from_half(np.frombuffer(body[5 + used :], dtype="<f2"), exponent), positions)


def _round_to_8_bits(x: float) -> float:
    """x rounded to 8 significant bits (the precision of bfloat16), as a float32 value."""
    bits = int(np.array([x], dtype=np.float32).view(np.uint32)[0])
    return float(np.array([(bits + 0x8000) & 0xFFFF0000], dtype=np.uint32).view(np.float32)[0])


class Ternary:
    name: ClassVar[str] = "ternary"
    codec_id: ClassVar[int] = 3
    sparse: ClassVar[bool] = True

    def encode(
        self, values: np.ndarray, *, density: float, threshold: float | None = None
    ) -> tuple[bytes, Decoded]:
        positions = top_k(values, keep_count(values.size, density), threshold)
        magnitudes = np.abs(values[positions])
        mu = _round_to_8_bits(float(magnitudes.mean(dtype=np.float64))) if positions.size else 0.0
        useful = (magnitudes >= mu / 2) & (magnitudes <= mu * 2.0**16)
        positions = positions[useful]
        negative = values[positions] < 0
        mu32 = np.float32(mu)
        decoded = np.where(negative, -mu32, mu32).astype(np.float32)
        body = _U32.pack(positions.size) + _F32.pack(mu) + encode_positions(positions, values.size)
        return body + np.packbits(negative, bitorder="little").tobytes(), Decoded(decoded, positions)

    def decode(self, body: memoryview, n: int) -> Decoded:
        k = _count(body, n, "ternary tensor")
        if len(body) < 8:
            raise PayloadError("ternary tensor: body truncated", "truncated")
        (mu,) = _F32.unpack_from(body, 4)
        if not math.isfinite(mu) or mu < 0:
            raise PayloadError(
                f"ternary tensor: magnitude {mu} is not a finite non-negative number", "non-finite"
            )
        positions, used = decode_positions(body[8:], n, k)
        signs = np.frombuffer(body[8 + used :], dtype=np.uint8)
        _exact_size(body[8 + used :], (k + 7) // 8, "ternary signs")
        negative = np.unpackbits(signs, bitorder="little")
        if negative[k:].any():
            raise PayloadError("ternary tensor: sign padding bits are set", "bad-body")
        mu32 = np.float32(mu)
        return Decoded(np.where(negative[:k] == 1, -mu32, mu32).astype(np.float32), positions)


class Int8:
    name: ClassVar[str] = "int8"
    codec_id: ClassVar[int] = 4
    sparse: ClassVar[bool] = False

    def encode(
        self, values: np.ndarray, *, density: float, threshold: float | None = None
    ) -> tuple[bytes, Decoded]:
        n, block = values.size, INT8_BLOCK
        blocks = -(-n // block)
        padded = np.zeros(blocks * block, dtype=np.float32)
        padded[:n] = values
        rows = padded.reshape(blocks, block)
        scales = (np.abs(rows).max(axis=1) / np.float32(127)).astype(np.float32)
        safe = np.where(scales > 0, scales, np.float32(1))
        levels = np.clip(np.rint(rows / safe[:, None]), -127, 127).astype(np.int8)
        body = _U32.pack(block) + scales.astype("<f4").tobytes() + levels.ravel()[:n].tobytes()
        return body, Decoded(self._values(levels.ravel()[:n], scales, block))

    @staticmethod
    def _values(levels: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
        values: np.ndarray = levels.astype(np.float32) * np.repeat(scales, block)[: levels.size]
        return values

    def decode(self, body: memoryview, n: int) -> Decoded:
        if len(body) < 4:
            raise PayloadError("int8 tensor: body truncated", "truncated")
        (block,) = _U32.unpack_from(body)
        if not 1 <= block <= MAX_INT8_BLOCK:
            raise PayloadError(f"int8 tensor: block size {block} outside [1, {MAX_INT8_BLOCK}]", "bad-body")
        blocks = -(-n // block)
        _exact_size(body, 4 + 4 * blocks + n, "int8 tensor")
        scales = np.frombuffer(body[4 : 4 + 4 * blocks], dtype="<f4").astype(np.float32)
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise PayloadError("int8 tensor: a block scale is negative, NaN or infinite", "non-finite")
        levels = np.frombuffer(body[4 + 4 * blocks :], dtype=np.int8)
        if (levels == -128).any():
            raise PayloadError("int8 tensor: level -128 is not used by the format", "bad-body")
        values = self._values(levels, scales, block)
        _finite(values, "int8 tensor")
        return Decoded(values)


CODECS: dict[str, Codec] = {codec.name: codec for codec in (Dense(), Fp16(), TopK(), Ternary(), Int8())}
CODEC_IDS: dict[int, Codec] = {codec.codec_id: codec for codec in CODECS.values()}
