"""summary.json: the machine-readable verdict of a run, for scheduled audits and CI gates.

The contract (../shared/DESIGN.md): ``run_id``, ``status`` (pass|warn|fail), ``thresholds``,
``rows``, ``errors`` and ``classes``, one entry per class and explained target kind with
``label``, ``label_name``, ``n``, ``status``, the class's rates and its ``flags``
({``kind``, ``status``, ``method``, ``value``, ``threshold``}). A rate is
``{"value", "ci": [low, high], "n"}`` with ``n`` the rows it was measured on; null where
nothing could be measured.

Evidence by intervention, where the run computed it (null or absent otherwise): per class
``context_reliance`` and ``object_sufficiency`` (``kept``, ``base`` and ``excess``, see
:class:`audit.report.aggregate.Reliance`), ``faithfulness`` (``average_drop`` and ``increase``
per method and the consensus) and ``intervention`` ({``verdict``, ``note``}: whether the model's
answers back the off-object evidence); for the run, ``faithfulness``: the overall means and
the most faithful method (lowest Average Drop, then highest Increase in Confidence).

Strategy clusters (:mod:`audit.report.clusters`): ``cluster_method`` for the run, per class ``clusters``,
each {``cluster`` (1, 2, ... by size; null for the pooled small ones), ``region``, ``n``,
``share``, ``accuracy``, ``off_object``, ``context_reliance``, ``metadata`` (over-represented
values), ``examples`` (image ids), ``flags``}; cluster flags carry ``cluster`` (the region) and
count towards the class's ``status`` where they add to its own flags (a kind the class is not
already flagged for at that status).

The model-randomization sanity check (:mod:`audit.report.sanity`), where the run has one:
``sanity`` = {``images``, ``seeds``, ``guided_images``, ``threshold``, ``steps`` (each
{``randomized``: module names, ``similarity``: {method: median Spearman}}, step 0 being the
classifier alone), ``verdict`` ({method: pass|fail}), ``notes``, ``seconds``}, or {``error``}.
Every flag says whether it ``stands``: a flag raised only by methods that failed the check does
not, and does not count towards its class's ``status``.
"""

from __future__ import annotations

import pandas as pd

from audit.explain.metrics import LOCALIZED
from audit.history import lease_note, liveness
from audit.models.anatomy import MIN_MAP_SIDE
from audit.report.aggregate import FAITHFULNESS_KINDS, counted_pairs
from audit.report.clusters import OTHER
from audit.report.flags import ClassResult, worst
from audit.report.load import RunData
from audit.report.sanity import SanityView
from audit.report.thresholds import Thresholds

SUMMARY_FORMAT = "cam-audit-summary/1"


def make_summary(
    run: RunData,
    results: list[ClassResult],
    thresholds: Thresholds,
    malignant: list[dict] | None = None,
    cluster_method: str = "consensus",
    sanity: SanityView | None = None,
) -> dict:
    rows = run.rows
    notes = []
    if run.proportional:
        notes.append(
            "CAM and Grad-CAM are proportional by construction on this model (last feature map of a "
            "global-average-pool -> linear network): their agreement is not counted as evidence."
        )
    coarse = coarse_maps_note(run)
    if coarse:
        notes.append(coarse)
    state = liveness(run.info, run.run_dir)
    if state == "live":
        notes.append(f"the run is still running ({lease_note(run.info)}): rates cover the rows it holds so far")
    elif state == "dead":
        notes.append(
            f"the run died while running ({lease_note(run.info)}): rates cover the rows it holds; "
            "finish it with `audit run --resume`"
        )
    elif run.info.get("status") != "complete":
        notes.append(f"the run is {run.info.get('status', 'unknown')}: rates cover the rows it holds")
    summary = {
        "format": SUMMARY_FORMAT,
        "run_id": run.info.get("run_id", run.run_dir.name),
        "status": worst(r.status for r in results),
        "thresholds": thresholds.to_dict(),
        "rows": int(len(rows)),
        "errors": int(rows["status"].ne("ok").sum()),
        "run_status": run.info.get("status"),
        "run_liveness": state,
        "target_kinds": run.target_kinds,
        "counted_pairs": list(counted_pairs(run.proportional)),
        "cluster_method": cluster_method,
        "notes": notes,
        "classes": [_class_entry(r) for r in results],
    }
    if sanity is not None:
        summary["sanity"] = sanity.to_dict()
        if run.proportional and not sanity.error:
            notes.append(
                "CAM and Grad-CAM are one witness on this model, not two: both passing the sanity check "
                "(or failing it) says the same thing twice."
            )
    faithful = run_faithfulness(run)
    if faithful:
        summary["faithfulness"] = faithful
    if malignant:
        summary["malignant_vs_benign"] = malignant
    return summary


def coarse_maps_note(run: RunData) -> str | None:
    """The rule: maps with fewer than MIN_MAP_SIDE cells on a side cannot localize small objects."""
    size = run.map_size
    if size is None or min(size) >= MIN_MAP_SIDE:
        return None
    layer = run.info["model"].get("target_layer")
    finer = run.info["model"].get("finer_layer")
    suggestion = (
        f"; a finer layer: --target-layer {finer[0]} ({finer[1]}x{finer[2]})" if finer else "; no finer layer was found"
    )
    return (
        f"the maps are {size[0]}x{size[1]} at {layer}: fewer than {MIN_MAP_SIDE} cells on a side, too coarse for "
        "localization evidence (off-object, energy in mask) to be trusted on objects a few cells wide; the "
        f"evidence by intervention does not depend on map resolution{suggestion}"
    )


def run_faithfulness(run: RunData) -> dict | None:
    """Average Drop % and Increase in Confidence % over all ok rows of the first target kind, per
    method, and the most faithful method; None for a run without the faithfulness measures."""
    rows = run.rows[run.rows["status"].eq("ok") & run.rows["target_kind"].eq(run.target_kinds[0])]
    means = {}
    for kind, prefix in zip(FAITHFULNESS_KINDS, ("drop", "increase")):
        for method in LOCALIZED:
            values = pd.to_numeric(rows[f"{prefix}_{method}"], errors="coerce").dropna()
            if len(values):
                means.setdefault(kind, {})[method] = round(float(values.mean()), 4)
    if not means:
        return None
    methods = [m for m in means["average_drop"] if m != "consensus"]
    best = min(methods, key=lambda m: (means["average_drop"][m], -means["increase"][m]), default=None)
    return {"target_kind": run.target_kinds[0], "rows": int(len(rows)), **means, "most_faithful": best}


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
        **_evidence_entry(result),
        **_clusters_entry(result),
    }


def _clusters_entry(result: ClassResult) -> dict:
    strategies = result.strategies
    if strategies is None:
        return {}
    clusters = []
    for cluster in strategies.clusters:
        clusters.append(
            {
                "cluster": None if cluster.index == OTHER else cluster.index + 1,
                "region": cluster.region,
                "n": cluster.n,
                "share": round(cluster.share, 4),
                "accuracy": None if cluster.accuracy is None else round(cluster.accuracy, 4),
                "off_object": cluster.off_object.to_dict(),
                "context_reliance": cluster.context.to_dict() if cluster.context else None,
                "metadata": cluster.metadata,
                "examples": cluster.examples,
                "flags": [f.to_dict() for f in cluster.flags],
            }
        )
    return {"clusters": clusters}


def _evidence_entry(result: ClassResult) -> dict:
    stats = result.stats
    entry = {}
    for name, intervention in (("context_reliance", "object_hidden"), ("object_sufficiency", "object_alone")):
        if intervention in stats.reliance:
            entry[name] = stats.reliance[intervention].to_dict()
    faithful = {kind: {m: r.to_dict() for m, r in stats.evidence(kind).items()} for kind in FAITHFULNESS_KINDS}
    if any(faithful.values()):
        entry["faithfulness"] = faithful
    verdict = result.intervention()
    if "context_reliance" in entry:
        entry["intervention"] = {"verdict": verdict[0], "note": verdict[1]} if verdict else None
    return entry
