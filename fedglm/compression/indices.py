"""Coding the positions of kept values: strictly increasing integers in [0, n).

Two coders; the encoder keeps whichever is smaller for the tensor at hand:
- Elias-Fano (coder 0): `l = floor(log2(n/k))` low bits per index stored verbatim, the high
  parts in unary. Never more than `2 + log2(n/k)` bits per index, within about 0.5 bit of the
  uniform bound `log2 C(n, k) / k`, whatever the positions.
- gaps + byte shuffle + zstd (coder 1): gaps between positions as little-endian uint32, the
  four byte planes stored one after another, then zstd. Top-k positions of a real update
  cluster (rows and columns that moved together), and an adaptive coder then goes below the
  uniform bound.

Layout of an index block: coder (u8), coded length (u32), coded bytes. The decoder checks
lengths, that padding bits are zero, that positions strictly increase and stay below n.
"""

from __future__ import annotations

import struct

import numpy as np
import zstandard

from fedglm.compression.wire import PayloadError

ELIAS_FANO = 0
GAPS_ZSTD = 1
ZSTD_LEVEL = 3
SAMPLE_GAPS = 1 << 16
_BLOCK = struct.Struct("<BI")


def low_bits(n: int, k: int) -> int:
    return (n // k).bit_length() - 1 if 0 < k < n else 0


def elias_fano_size(n: int, k: int) -> int:
    """Bytes of the Elias-Fano code for k positions in [0, n) (it does not depend on which)."""
    if k == 0:
        return 0
    lb = low_bits(n, k)
    return (k * lb + 7) // 8 + (k + ((n - 1) >> lb) + 1 + 7) // 8


def _pack_bits(bits: np.ndarray) -> bytes:
    return np.packbits(bits, bitorder="little").tobytes()


def _elias_fano_encode(positions: np.ndarray, n: int) -> bytes:
    k = positions.size
    if k == 0:
        return b""
    lb = low_bits(n, k)
    low_part = b""
    if lb:
        low = (positions & ((1 << lb) - 1)).astype("<u4").view(np.uint8).reshape(k, 4)
        low_part = _pack_bits(np.unpackbits(low, axis=1, bitorder="little")[:, :lb].ravel())
    high_bits = np.zeros(k + ((n - 1) >> lb) + 1, dtype=np.uint8)
    high_bits[(positions >> lb) + np.arange(k, dtype=np.int64)] = 1
    return low_part + _pack_bits(high_bits)


def _elias_fano_decode(code: memoryview, n: int, k: int) -> np.ndarray:
    if len(code) != elias_fano_size(n, k):
        raise PayloadError(
            f"Elias-Fano block of {len(code)} bytes, {elias_fano_size(n, k)} expected for {k} of {n}",
            "bad-indices",
        )
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    lb = low_bits(n, k)
    low_len = (k * lb + 7) // 8
    raw = np.frombuffer(code, dtype=np.uint8)
    n_high = k + ((n - 1) >> lb) + 1
    high_bits = np.unpackbits(raw[low_len:], bitorder="little")
    if high_bits[n_high:].any():
        raise PayloadError("Elias-Fano padding bits are set", "bad-indices")
    ones = np.flatnonzero(high_bits[:n_high])
    if ones.size != k:
        raise PayloadError(f"Elias-Fano high part holds {ones.size} positions, {k} declared", "bad-indices")
    positions = (ones - np.arange(k, dtype=np.int64)) << lb
    if lb:
        low = np.unpackbits(raw[:low_len], bitorder="little")
        if low[k * lb :].any():
            raise PayloadError("Elias-Fano padding bits are set", "bad-indices")
        weights = np.left_shift(1, np.arange(lb, dtype=np.int64))
        positions |= low[: k * lb].reshape(k, lb).astype(np.int64) @ weights
    return positions


def _gaps_encode(positions: np.ndarray) -> bytes:
    gaps = np.diff(positions, prepend=-1) - 1
    planes = gaps.astype("<u4").view(np.uint8).reshape(-1, 4).T
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(np.ascontiguousarray(planes).tobytes())


def _gaps_decode(code: memoryview, k: int) -> np.ndarray:
    """Gaps from one zstd frame that must declare exactly 4k bytes of content, with nothing after
    it: the declared size is checked before anything is allocated (a frame may claim any size)."""
    try:
        declared = zstandard.get_frame_parameters(code).content_size
        if declared != 4 * k:
            raise PayloadError(
                f"index block declares {declared} bytes of gaps, {4 * k} expected", "bad-indices"
            )
        raw = zstandard.ZstdDecompressor().decompress(code, max_output_size=4 * k)
        stream = zstandard.ZstdDecompressor().decompressobj()
        stream.decompress(code)
        if not stream.eof or stream.unused_data:
            raise PayloadError("index block has bytes after its zstd frame", "bad-indices")
    except zstandard.ZstdError as exc:
        raise PayloadError(f"index block does not decompress ({exc})", "bad-indices") from None
    if len(raw) != 4 * k:
        raise PayloadError(f"index block holds {len(raw) // 4} gaps, {k} declared", "bad-indices")
    gaps = np.frombuffer(raw, dtype=np.uint8).reshape(4, k).T.copy().view("<u4").ravel()
    return np.cumsum(gaps.astype(np.int64) + 1) - 1


def encode_positions(positions: np.ndarray, n: int) -> bytes:
    """Index block for strictly increasing int64 `positions` in [0, n): the smaller coder.

    Elias-Fano's size is known without encoding. zstd is tried on a prefix of SAMPLE_GAPS
    gaps first, and on all of them only if the prefix suggests it can win (positions spread
    uniformly never let it win, and the attempt would cost a pass over them).
    """
    k = positions.size
    coder, code = ELIAS_FANO, b""
    if k:
        ef_size = elias_fano_size(n, k)
        if k <= SAMPLE_GAPS or len(_gaps_encode(positions[:SAMPLE_GAPS])) * k / SAMPLE_GAPS < ef_size:
            code, coder = _gaps_encode(positions), GAPS_ZSTD
        if coder == ELIAS_FANO or len(code) >= ef_size:
            coder, code = ELIAS_FANO, _elias_fano_encode(positions, n)
    return _BLOCK.pack(coder, len(code)) + code


def decode_positions(data: memoryview, n: int, k: int) -> tuple[np.ndarray, int]:
    """(positions, bytes consumed) from the index block at the start of `data`."""
    if len(data) < _BLOCK.size:
        raise PayloadError("index block truncated", "truncated")
    coder, length = _BLOCK.unpack_from(data)
    end = _BLOCK.size + length
    if end > len(data):
        raise PayloadError(
            f"index block declares {length} bytes, {len(data) - _BLOCK.size} left", "truncated"
        )
    code = data[_BLOCK.size : end]
    if coder == ELIAS_FANO:
        positions = _elias_fano_decode(code, n, k)
    elif coder == GAPS_ZSTD and k:
        positions = _gaps_decode(code, k)
    elif coder == GAPS_ZSTD:
        raise PayloadError("an empty index block must use coder 0 with no bytes", "bad-indices")
    else:
        raise PayloadError(f"unknown index coder {coder}", "bad-indices")
    if k and positions[-1] >= n:
        raise PayloadError(
            f"index {int(positions[-1])} out of range for a tensor of {n} values", "index-out-of-range"
        )
    if k > 1 and not (np.diff(positions) > 0).all():
        raise PayloadError("indices are not strictly increasing", "index-not-increasing")
    return positions, end
