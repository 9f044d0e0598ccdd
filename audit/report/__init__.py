"""The report stage: per-class aggregation, flag rules, summary.json and a self-contained report.html.

The names are loaded on first use, so that the command line (which needs only the thresholds to
build its options) starts without importing torch and matplotlib.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from audit.report.build import REPORT_FILE, SUMMARY_FILE, ReportResult, build_report
    from audit.report.thresholds import Thresholds

_EXPORTS = {
    "REPORT_FILE": "audit.report.build",
    "SUMMARY_FILE": "audit.report.build",
    "ReportResult": "audit.report.build",
    "build_report": "audit.report.build",
    "Thresholds": "audit.report.thresholds",
}
__all__ = ["REPORT_FILE", "SUMMARY_FILE", "ReportResult", "Thresholds", "build_report"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
