"""What several compression tests share: the payload's byte layout, read independently of
`fedglm/compression/wire.py`, and the hypothesis settings."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, settings

HEADER_SIZE = 80


def hypothesis_settings(max_examples: int) -> settings:
    """Deterministic runs, no example database, no deadline."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


def table_offsets(blob: bytes) -> list[dict[str, int]]:
    """Offsets of each table entry's fields and of each body, read independently of wire.py."""
    (count,) = struct.unpack_from("<I", blob, 12)
    pos, entries = HEADER_SIZE, []
    for _ in range(count):
        entry = {"name_len": pos}
        (name_len,) = struct.unpack_from("<H", blob, pos)
        entry["name"] = pos + 2
        pos += 2 + name_len
        entry["rank"] = pos
        rank = blob[pos]
        entry["dims"] = pos + 1
        pos += 1 + 4 * rank
        entry["dtype"] = pos
        entry["body_len"] = pos + 1
        entry["length"] = struct.unpack_from("<I", blob, pos + 1)[0]
        pos += 5
        entries.append(entry)
    for entry in entries:
        entry["body"] = pos
        pos += entry["length"]
    assert pos == len(blob) - 32
    return entries
