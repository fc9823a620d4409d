"""Compressed model updates: codecs, index coding, error feedback and the wire format.

See `compression/FORMAT.md` (repository top level) for the byte layout and `codecs` for what
each codec sends.
"""

from fedglm.compression.codecs import CODEC_IDS, CODECS, Codec, Decoded
from fedglm.compression.update import check_header, decode, encode, model_hash
from fedglm.compression.wire import NO_HASH, Header, Kind, PayloadError

__all__ = [
    "CODECS",
    "CODEC_IDS",
    "NO_HASH",
    "Codec",
    "Decoded",
    "Header",
    "Kind",
    "PayloadError",
    "check_header",
    "decode",
    "encode",
    "model_hash",
]
