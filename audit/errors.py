"""Errors that the CLI turns into a one-line message and a meaningful exit code."""

from __future__ import annotations


class AuditError(Exception):
    """An error caused by the user's input (data, checkpoint, options): exit code 2, no traceback."""

    exit_code = 2


class CheckpointError(AuditError):
    """A checkpoint file that cannot be used: missing, not a cam-audit checkpoint, or inconsistent."""


class ModelAnatomyError(AuditError):
    """The target layer or the classifier cannot be found, or a named one does not fit."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type name when it has none): for one-line errors."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
