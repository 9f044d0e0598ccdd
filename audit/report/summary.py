"""summary.json: the machine-readable verdict of a run, for scheduled audits and CI gates.

The contract (../shared/DESIGN.md): ``run_id``, ``status`` (pass|warn|fail), ``thresholds``,
``rows``, ``errors`` and ``classes``, one entry per class and explained target kind with
``label``, ``label_name``, ``n``, ``status``, the class's rates and its ``flags``
({``kind``, ``status``, ``method``, ``value``, ``threshold``}). A rate is
``{"value", "ci": [low, high], "n"}`` with ``n`` the rows it was measured on; null where
nothing could be measured.
"""

from __future__ import annotations

from audit.report.aggregate import counted_pairs
from audit.report.flags import ClassResult, worst
from audit.report.load import RunData
from audit.report.thresholds import Thresholds

SUMMARY_FORMAT = "cam-audit-summary/1"


def make_summary(
    run: RunData, results: list[ClassResult], thresholds: Thresholds, malignant: list[dict] | None = None
) -> dict:
    rows = run.rows
    notes = []
    if run.proportional:
        notes.append(
            "CAM and Grad-CAM are proportional by construction on this model (last feature map of a "
            "global-average-pool -> linear network): their agreement is not counted as evidence."
        )
    if run.info.get("status") != "complete":
        notes.append(f"the run is {run.info.get('status', 'unknown')}: rates cover the rows it holds")
    summary = {
        "format": SUMMARY_FORMAT,
        "run_id": run.info.get("run_id", run.run_dir.name),
        "status": worst(r.status for r in results),
        "thresholds": thresholds.to_dict(),
        "rows": int(len(rows)),
        "errors": int(rows["status"].ne("ok").sum()),
        "run_status": run.info.get("status"),
        "target_kinds": run.target_kinds,
        "counted_pairs": list(counted_pairs(run.proportional)),
        "notes": notes,
        "classes": [_class_entry(r) for r in results],
    }
    if malignant:
        summary["malignant_vs_benign"] = malignant
    return summary


def _class_entry(result: ClassResult) -> dict:
    stats = result.stats
    return {
        "label": result.label,
        "label_name": result.label_name,
        "target_kind": result.target_kind,
        "n": stats.n,
        "ok": stats.ok,
        "errors": stats.errors,
        "status": result.status,
        "judged": result.judged,
        "accuracy": None if stats.accuracy is None else round(stats.accuracy, 4),
        "low_agreement": {k: r.to_dict() for k, r in stats.rates["low_agreement"].items()},
        "off_object": {k: r.to_dict() for k, r in stats.rates["off_object"].items()},
        "energy_in_mask": stats.energy,
        "agreement": stats.agreement,
        "flags": [f.to_dict() for f in result.flags],
    }
