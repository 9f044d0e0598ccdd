"""The report stage: per-class aggregation, flag rules, summary.json and a self-contained report.html."""

from audit.report.build import REPORT_FILE, SUMMARY_FILE, ReportResult, build_report
from audit.report.thresholds import Thresholds

__all__ = ["REPORT_FILE", "SUMMARY_FILE", "ReportResult", "Thresholds", "build_report"]
