"""The report stage: a run directory in, summary.json and report.html out, nothing recomputed."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from audit.config import DEFAULT_TOLERANCE
from audit.history import is_run, location
from audit.report.compare import COMPARE_FILE, Comparison, compare_runs
from audit.report.figures import kind_title, method_title
from audit.report.flags import ICONS, STATUSES, ClassResult, assess, malignant_view
from audit.report.html import GALLERY_FLAGGED, SIZE_WARNING_BYTES, malignant_summary, render_report
from audit.report.load import ReportInputError, RunData, load_run
from audit.report.sanity import SanityView, read_sanity, stands, trusted_cluster_method
from audit.report.summary import make_summary
from audit.report.thresholds import Thresholds
from audit.run_store import publish

SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"


@dataclass
class ReportResult:
    run_dir: Path
    summary: dict
    results: list[ClassResult]
    html_bytes: int
    warnings: list[str] = field(default_factory=list)
    comparison: Comparison | None = None
    sanity: SanityView | None = None

    @property
    def status(self) -> str:
        return self.summary["status"]

    @property
    def html_path(self) -> Path:
        return self.run_dir / REPORT_FILE

    @property
    def html_location(self) -> str:
        """Where the report is, as a user names it: a URI for a run on object storage."""
        return f"{location(self.run_dir)}/{REPORT_FILE}"

    @property
    def summary_path(self) -> Path:
        return self.run_dir / SUMMARY_FILE

    def reaches(self, level: str) -> bool:
        """True when the run's status, or its comparison's, is ``level`` (warn|fail) or worse."""
        compared = self.comparison is not None and self.comparison.reaches(level)
        return compared or STATUSES.index(self.status) >= STATUSES.index(level)

    def headline(self) -> list[str]:
        """A few plain lines: the verdict, then one line per flagged class."""
        counts = {s: sum(r.status == s for r in self.results) for s in STATUSES}
        lines = [
            f"{ICONS[self.status]} {self.status.upper()}: {counts['fail']} fail, {counts['warn']} warn, "
            f"{counts['pass']} pass ({len(self.results)} class x target results)"
        ]
        if self.sanity is not None:
            lines.append(f"  sanity check: {sanity_line(self.sanity)}")
        failing = self.sanity.failing if self.sanity is not None else frozenset()
        for result in self.results:
            where = f"{result.label_name} ({result.target_kind})"
            for group in result.flag_groups:
                others = [
                    method_title(m) + ("" if stands(m, failing) else " (failed the sanity check)") for m in group.others
                ]
                also = f"; also {', '.join(others)}" if others else ""
                lines.append(f"  {_icon(group.lead)} {where}: {describe(group.lead)}{also}")
            for flag in result.cluster_flags:
                lines.append(f"  {_icon(flag)} {where}: {describe(flag)}")
        compared = self.comparison.headline() if self.comparison is not None else []
        return lines + compared + self.warnings


def _icon(flag) -> str:
    return ICONS[flag.status] if flag.stands else "?"


def sanity_line(sanity: SanityView) -> str:
    """E.g. ``CAM pass (0.02), Grad-CAM pass (0.02), Grad-CAM++ FAIL (0.97), consensus pass (0.31)``:
    each method's verdict and its similarity after the classifier alone was re-initialised."""
    if sanity.error:
        return f"did not run ({sanity.error})"
    first = sanity.steps[0]["similarity"] if sanity.steps else {}
    parts = [
        f"{method_title(m)} {'FAIL' if v == 'fail' else 'pass'} ({first[m]:.2f})" for m, v in sanity.verdict.items()
    ]
    return ", ".join(parts) + f" (similarity with the classifier re-initialised; fail at >= {sanity.threshold:g})"


def describe(flag) -> str:
    """One sentence for a flag, e.g. ``off-object (consensus): 92% of images, 95% CI 80-100%, fail at >= 50%``."""
    method = method_title(flag.method)
    what = "of correct images beyond the base rate" if flag.kind == "context_reliance" else "of images"
    where = f"strategy cluster at the {flag.cluster}: " if flag.cluster else ""
    unconfirmed = "" if flag.stands else f" (not confirmed: {method} failed the sanity check)"
    return (
        f"{where}{kind_title(flag.kind)} ({method}): {100 * flag.value:.0f}% {what}, "
        f"95% CI {100 * flag.low:.0f}-{100 * flag.high:.0f}%, {flag.status} at >= {100 * flag.threshold:.0f}%"
        f"{unconfirmed}"
    )


def thresholds_of(run: RunData) -> Thresholds:
    """The thresholds the run was configured with (defaults where it named none)."""
    return Thresholds.from_dict(run.info.get("config", {}).get("thresholds") or {})


def build_report(
    run_dir: Path | str,
    overrides: dict | None = None,
    gallery: int = GALLERY_FLAGGED,
    baseline: Path | str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    cluster_method: str | None = None,
) -> ReportResult:
    """Aggregate, flag, and write ``summary.json`` and ``report.html`` into the run directory.

    Thresholds are the run's own (its config, else the defaults) with ``overrides`` applied. With
    a ``baseline`` run, the run is also compared with it under the same thresholds: the report
    gains a comparison section and ``compare.json`` is written beside it. Without one, a run
    compared before is compared again with the same baseline, so the two files never disagree."""
    run = load_run(run_dir)
    thresholds = thresholds_of(run).updated(**(overrides or {}))
    sanity = read_sanity(run.run_dir, thresholds.sanity_similarity_max)
    failing = sanity.failing if sanity else frozenset()
    cluster_note = None
    if cluster_method is None:
        cluster_method, cluster_note = trusted_cluster_method(run, failing)
    results = assess(run, thresholds, cluster_method, failing)
    warnings = []
    if baseline is None:
        baseline, tolerance = _previous_comparison(run.run_dir, tolerance, warnings)
    comparison = None
    if baseline is not None:
        before = load_run(baseline)
        if before.run_dir == run.run_dir:
            raise ReportInputError(f"a run cannot be its own baseline: {location(run.run_dir)}")
        comparison = compare_runs(before, run, thresholds, tolerance, results, cluster_method)
    malignant = malignant_summary(malignant_view(run, thresholds))
    summary = make_summary(run, results, thresholds, malignant, cluster_method, sanity)
    if cluster_note:
        summary["notes"].append(cluster_note)
    html = render_report(run, results, summary, thresholds, gallery, comparison, sanity)
    _write_atomic(run.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    if comparison is not None:
        _write_atomic(run.run_dir / COMPARE_FILE, json.dumps(comparison.to_dict(), indent=2))
    _write_atomic(run.run_dir / REPORT_FILE, html)
    publish(run.run_dir, SUMMARY_FILE, REPORT_FILE, *([COMPARE_FILE] if comparison is not None else []))
    size = len(html.encode("utf-8"))
    if size > SIZE_WARNING_BYTES:
        warnings.append(
            f"warning: {REPORT_FILE} is {size / 1e6:.0f} MB (over {SIZE_WARNING_BYTES / 1e6:.0f} MB); "
            "lower --gallery to make it lighter"
        )
    return ReportResult(run.run_dir, summary, results, size, warnings, comparison, sanity)


def _previous_comparison(run_dir: Path, tolerance: float, warnings: list[str]) -> tuple[str | None, float]:
    """The baseline and tolerance of the run's last comparison, if it had one whose baseline still exists."""
    path = run_dir / COMPARE_FILE
    if not path.is_file():
        return None, tolerance
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
        baseline, tolerance = str(previous["baseline_dir"]), float(previous["tolerance"])
    except (OSError, ValueError, KeyError, TypeError):
        baseline = None
    if baseline is None or not is_run(baseline):
        path.unlink()
        publish(run_dir, COMPARE_FILE)
        warnings.append(f"note: the baseline of the last comparison is gone; {COMPARE_FILE} was removed")
        return None, tolerance
    return baseline, tolerance


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
