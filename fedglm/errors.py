"""Errors a user can cause, and the exit codes the CLI maps them to.

Exit codes (a contract, see README): 0 success; 1 a check failed; 2 bad usage or bad input;
3 (`fedglm audit` only) nothing failed, but the ledger was not verified against the
coordinator's receipts, so the result proves less than a 0.
Every message is one line that names what is wrong and how to fix it.
"""

from __future__ import annotations

from pathlib import Path


class FedglmError(Exception):
    """Base class: an expected failure with a one-line message for the user."""

    exit_code = 1


class InputError(FedglmError):
    """Bad usage or bad input (config, data file, certificate, port): exit code 2."""

    exit_code = 2


class CheckFailed(FedglmError):
    """A run or check did not succeed (a failed run, a failed verification): exit code 1."""

    exit_code = 1


class Unverified(FedglmError):
    """A check passed only in a weaker mode than asked of it (an audit without the
    coordinator's receipts): exit code 3."""

    exit_code = 3


def check_out_folder(folder: Path, option: str = "--out") -> None:
    """Refuse an output folder that names an existing file (before anything is written)."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{option} {folder} is an existing file, not a folder; name a folder")
