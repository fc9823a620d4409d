"""JSON from another party, read within bounds and without ambiguity.

Ledger lines, receipts and the ledger records in a site's reply are signed or hashed as JSON,
and read by more than one program. Python's `json` keeps the last of two equal keys where
another reader may keep the first, so a line with a duplicate key could mean one thing to
the auditor and another to the coordinator: such a line is refused. The text's length and
nesting depth are bounded before parsing (a deep nesting would exhaust the parser's stack),
integers are limited to 30 digits and numbers must be finite (NaN, Infinity and 1e999 are
refused).
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 16
MAX_INT_DIGITS = 30


class StrictJSONError(ValueError):
    """Text that is not one unambiguous, bounded JSON value."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise StrictJSONError(f"duplicate key {key[:40]!r}")
        obj[key] = value
    return obj


def _depth(text: str) -> int:
    """Largest bracket nesting outside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def loads(text: str, *, max_chars: int) -> Any:
    """The JSON value of `text`; `StrictJSONError` naming what is wrong if it is too long,
    too deep, holds a huge integer or a duplicate key, or is not JSON."""
    if len(text) > max_chars:
        raise StrictJSONError(f"{len(text)} characters, more than the {max_chars} allowed")
    if _depth(text) > MAX_DEPTH:
        raise StrictJSONError(f"nested more than {MAX_DEPTH} levels deep")
    try:
        return json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_refuse_constant,
            parse_int=_bounded_int,
            parse_float=_finite_float,
        )
    except StrictJSONError:
        raise
    except (ValueError, RecursionError) as exc:
        message = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise StrictJSONError(f"not valid JSON ({message})") from None


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise StrictJSONError(f"an integer of {len(digits)} digits (at most {MAX_INT_DIGITS})")
    return int(digits)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StrictJSONError(f"the number {text[:20]} overflows")
    return value


def _refuse_constant(name: str) -> Any:
    raise StrictJSONError(f"{name} is not a JSON number")
