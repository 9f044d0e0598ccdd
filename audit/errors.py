"""Errors that the CLI turns into a one-line message and a meaningful exit code."""

from __future__ import annotations


class AuditError(Exception):
    """An error caused by the user's input (data, checkpoint, options): exit code 2, no traceback."""

    exit_code = 2


class CheckpointError(AuditError):
    """A checkpoint file that cannot be used: missing, not a cam-audit checkpoint, or inconsistent."""


class ModelAnatomyError(AuditError):
    """The target layer or the classifier cannot be found, or a named one does not fit."""
