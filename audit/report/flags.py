"""Flag rules: per class and target kind, ``low_agreement`` and ``off_object``, each warn or fail.

A rate raises a flag when the lower end of its confidence interval reaches the kind's warn
(or fail) rate, so a flag says "more than this share of the class, beyond sampling noise".
``low_agreement`` is judged overall (``all``) and for each counted method pair; CAM vs
Grad-CAM is not counted when the two are proportional by construction (last feature map of a
global-average-pool -> linear network). ``off_object`` is judged for each method and for the
consensus map. A rate over fewer than ``min_rows`` rows is shown but never flagged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from audit.explain.metrics import LOCALIZED
from audit.report.aggregate import BOOTSTRAP_SEED, GroupStats, counted_pairs, indicators, summarize
from audit.report.load import RunData
from audit.report.thresholds import Thresholds

STATUSES = ("pass", "warn", "fail")
ICONS = {"pass": "\u2714", "warn": "\u26a0", "fail": "\u2716"}  # check mark, warning sign, heavy X


@dataclass(frozen=True)
class Flag:
    kind: str  # low_agreement | off_object
    status: str  # warn | fail
    method: str  # a method, "consensus", a pair "a_b", or "all"
    value: float
    threshold: float
    low: float
    high: float

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "status": self.status,
            "method": self.method,
            "value": round(self.value, 4),
            "threshold": self.threshold,
            "ci": [round(self.low, 4), round(self.high, 4)],
        }


@dataclass
class ClassResult:
    label: int
    label_name: str
    target_kind: str
    stats: GroupStats
    flags: list[Flag] = field(default_factory=list)
    judged: bool = True

    @property
    def status(self) -> str:
        return worst(f.status for f in self.flags)

    @property
    def flag_groups(self) -> list[FlagGroup]:
        """The flags of each kind as one lead flag (the overall one where raised, else the
        strongest) plus the other methods that raised the same kind: what a reader needs first."""
        groups = []
        for kind in ("off_object", "low_agreement"):
            flags = [f for f in self.flags if f.kind == kind]
            if flags:
                lead = max(flags, key=lambda f: (STATUSES.index(f.status), f.method in ("all", "consensus"), f.value))
                groups.append(FlagGroup(lead, tuple(f.method for f in flags if f is not lead)))
        return sorted(groups, key=lambda g: -STATUSES.index(g.lead.status))


@dataclass(frozen=True)
class FlagGroup:
    lead: Flag
    others: tuple[str, ...]


def worst(statuses) -> str:
    return max(statuses, key=STATUSES.index, default="pass")


def judge(stats: GroupStats, thresholds: Thresholds, pairs: tuple[str, ...]) -> list[Flag]:
    """The flags one set of rows raises, fail before warn within a kind."""
    flags = []
    for kind, methods in (("low_agreement", ("all", *pairs)), ("off_object", LOCALIZED)):
        for method in methods:
            rate = stats.rates[kind][method]
            if rate.scored < thresholds.min_rows or rate.low is None:
                continue
            for status in ("fail", "warn"):
                threshold = thresholds.rate_threshold(kind, status)
                if rate.low >= threshold:
                    flags.append(Flag(kind, status, method, rate.value, threshold, rate.low, rate.high))
                    break
    return sorted(flags, key=lambda f: -STATUSES.index(f.status))


def assess(run: RunData, thresholds: Thresholds) -> list[ClassResult]:
    """One result per model class and explained target kind, sorted fail -> warn -> pass."""
    pairs = counted_pairs(run.proportional)
    rows = run.rows
    flags = indicators(rows, thresholds, pairs)
    results = []
    for kind in run.target_kinds:
        for label, name in enumerate(run.classes):
            mask = run.class_rows(label, name, kind)
            rng = np.random.default_rng([BOOTSTRAP_SEED, label, run.target_kinds.index(kind)])
            stats = summarize(rows[mask], flags[mask], thresholds, rng)
            result = ClassResult(label, name, kind, stats, judge(stats, thresholds, pairs))
            result.judged = stats.scored >= thresholds.min_rows
            results.append(result)
    return sorted(results, key=lambda r: (-STATUSES.index(r.status), r.target_kind != "pred", r.label))


def malignant_view(run: RunData, thresholds: Thresholds) -> dict[str, GroupStats] | None:
    """HAM10000: the same aggregates for malignant and for benign classes (first target kind)."""
    if "malignant" not in run.rows:
        return None
    pairs = counted_pairs(run.proportional)
    rows = run.rows[run.rows["target_kind"].eq(run.target_kinds[0])]
    flags = indicators(rows, thresholds, pairs)
    malignant = rows["malignant"].astype("boolean")
    views = {"malignant": malignant.eq(True).fillna(False), "benign": malignant.eq(False).fillna(False)}
    return {
        name: summarize(rows[mask], flags[mask], thresholds, np.random.default_rng([BOOTSTRAP_SEED, i]))
        for i, (name, mask) in enumerate(views.items())
        if mask.any()
    }
