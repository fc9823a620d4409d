"""What every command shares: turning expected failures into one line and an exit code."""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import ParamSpec, TypeVar

import typer

from fedglm.errors import FedglmError

P = ParamSpec("P")
R = TypeVar("R")


def fail(message: str, code: int) -> typer.Exit:
    print(f"fedglm: error: {message}", file=sys.stderr)
    return typer.Exit(code)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def reports_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Print a `FedglmError` as one line on stderr and exit with its code (2 for bad input)."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        # `kill`, systemd stop: clean up exactly as on Ctrl-C (stop the run and every process).
        signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            return command(*args, **kwargs)
        except FedglmError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None

    return wrapper
