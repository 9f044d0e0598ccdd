"""Flag rules: per class and target kind, ``low_agreement``, ``off_object`` and
``context_reliance``, each warn or fail.

A rate raises a flag when the lower end of its confidence interval reaches the kind's warn
(or fail) rate, so a flag says "more than this share of the class, beyond sampling noise".
``low_agreement`` is judged overall (``all``) and for each counted method pair; CAM vs
Grad-CAM is not counted when the two are proportional by construction (last feature map of a
global-average-pool -> linear network). ``off_object`` is judged for each method and for the
consensus map. ``context_reliance`` is judged on the excess of the class's kept rate with the
object hidden over its base rate (:func:`audit.report.aggregate.reliance`). A rate over fewer
than ``min_rows`` rows is shown but never flagged.

Off-object is evidence from the maps, context reliance from the model's answers: where both
were measured, :meth:`ClassResult.intervention` says whether they agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from audit.explain.metrics import LOCALIZED
from audit.report.aggregate import (
    BOOTSTRAP_SEED,
    GroupStats,
    base_rates,
    counted_pairs,
    indicators,
    reliance,
    summarize,
)
from audit.report.clusters import GRID, OTHER, Strategies, class_strategies
from audit.report.load import RunData, strategy_maps
from audit.report.sanity import stands
from audit.report.thresholds import Thresholds

STATUSES = ("pass", "warn", "fail")
ICONS = {"pass": "\u2714", "warn": "\u26a0", "fail": "\u2716"}  # check mark, warning sign, heavy X


@dataclass(frozen=True)
class Flag:
    kind: str  # low_agreement | off_object | context_reliance
    status: str  # warn | fail
    method: str  # a method, "consensus", a pair "a_b", "all", or "occlusion" (context reliance)
    value: float
    threshold: float
    low: float
    high: float
    cluster: str | None = None  # the region a strategy cluster points at; None for the whole class
    stands: bool = True  # False when only methods that failed the sanity check raised it

    def to_dict(self) -> dict:
        entry = {
            "kind": self.kind,
            "status": self.status,
            "method": self.method,
            "value": round(self.value, 4),
            "threshold": self.threshold,
            "ci": [round(self.low, 4), round(self.high, 4)],
            "stands": self.stands,
        }
        return entry if self.cluster is None else {**entry, "cluster": self.cluster}


@dataclass
class ClassResult:
    label: int
    label_name: str
    target_kind: str
    stats: GroupStats
    flags: list[Flag] = field(default_factory=list)
    judged: bool = True
    strategies: Strategies | None = None
    cluster_flags: list[Flag] = field(default_factory=list)  # raised by a strategy cluster, not the class

    @property
    def status(self) -> str:
        """The worst standing flag's status: flags of methods that failed the sanity check do not count."""
        return worst(f.status for f in (*self.flags, *self.cluster_flags) if f.stands)

    @property
    def not_confirmed(self) -> bool:
        """Flagged, but only by methods that failed the sanity check."""
        flags = (*self.flags, *self.cluster_flags)
        return bool(flags) and not any(f.stands for f in flags)

    @property
    def flag_groups(self) -> list[FlagGroup]:
        """The flags of each kind as one lead flag (the overall one where raised, else the
        strongest) plus the other methods that raised the same kind: what a reader needs first."""
        groups = []
        for kind in FLAG_ORDER:
            flags = [f for f in self.flags if f.kind == kind]
            if flags:
                lead = max(
                    flags,
                    key=lambda f: (f.stands, STATUSES.index(f.status), f.method in ("all", "consensus"), f.value),
                )
                groups.append(FlagGroup(lead, tuple(f.method for f in flags if f is not lead)))
        return sorted(groups, key=lambda g: -STATUSES.index(g.lead.status))

    def intervention(self) -> tuple[str, str] | None:
        """Whether the model's answers back the maps: ``(verdict, sentence)``, or None where the run
        has no occlusion evidence for this class or neither kind of evidence flags it.

        Verdicts: ``confirmed`` (off-object and context-reliant), ``not_confirmed`` (off-object,
        but hiding the object changes the answers), ``intervention_only`` (context-reliant while
        the maps lie on the object: too coarse, or the context acts from where they point)."""
        context = self.stats.reliance.get("object_hidden")
        if context is None or context.excess is None:
            return None
        kinds = {f.kind for f in self.flags if f.stands}
        share = f"{_pct(context.kept.value)} of its correct images keep the class with the object hidden"
        base = f"(base rate {_pct(context.base.value)})"
        if "off_object" in kinds and "context_reliance" in kinds:
            return "confirmed", f"confirmed by intervention: {share} {base}"
        if "off_object" in kinds:
            return (
                "not_confirmed",
                f"not confirmed by intervention: the maps lie off the object, yet only {share} {base}; "
                "the answers depend on the object more than the maps suggest",
            )
        if "context_reliance" in kinds:
            return (
                "intervention_only",
                f"found by intervention only: {share} {base}, while the maps do not lie off the object "
                "(too coarse, or pointing at the object while the answer comes from elsewhere)",
            )
        return None


FLAG_ORDER = ("off_object", "context_reliance", "low_agreement")


@dataclass(frozen=True)
class FlagGroup:
    lead: Flag
    others: tuple[str, ...]


def _pct(value: float | None) -> str:
    return "?" if value is None else f"{100 * value:.0f}%"


def worst(statuses) -> str:
    return max(statuses, key=STATUSES.index, default="pass")


def judge(
    stats: GroupStats, thresholds: Thresholds, pairs: tuple[str, ...], failing: frozenset[str] = frozenset()
) -> list[Flag]:
    """The flags one set of rows raises, fail before warn within a kind; those raised only by
    methods in ``failing`` (the sanity check's) do not stand."""
    flags = []
    for kind, methods in (("low_agreement", ("all", *pairs)), ("off_object", LOCALIZED)):
        for method in methods:
            rate = stats.rates[kind][method]
            if rate.scored >= thresholds.min_rows and rate.low is not None:
                flags += _raised(kind, method, rate.value, rate.low, rate.high, thresholds)
    context = stats.reliance.get("object_hidden")
    if context is not None and context.kept.scored >= thresholds.min_rows and context.low is not None:
        flags += _raised("context_reliance", "occlusion", context.excess, context.low, context.high, thresholds)
    return sorted(_mark(flags, failing), key=lambda f: -STATUSES.index(f.status))


def _mark(flags: list[Flag], failing: frozenset[str]) -> list[Flag]:
    return [replace(f, stands=stands(f.method, failing)) for f in flags]


def judge_clusters(
    strategies: Strategies | None,
    class_flags: list[Flag],
    thresholds: Thresholds,
    failing: frozenset[str] = frozenset(),
) -> list[Flag]:
    """Judge the strategy clusters of a class split into several, and return the flags they add.

    A cluster holding at least ``cluster_share_min`` of the class and ``min_rows`` images is
    judged like a class, on the clustered method's off-object rate and on context reliance; its
    flags are kept on the cluster. A cluster flag adds to the class unless the class already has
    a flag of that kind at the same status or worse."""
    if strategies is None or not strategies.split:
        return []
    added = []
    for cluster in strategies.clusters:
        if cluster.index == OTHER or cluster.share < thresholds.cluster_share_min:
            continue
        rate, context, region = cluster.off_object, cluster.context, cluster.region
        if rate.scored >= thresholds.min_rows and rate.low is not None:
            cluster.flags += _raised(
                "off_object", strategies.method, rate.value, rate.low, rate.high, thresholds, region
            )
        if context is not None and context.kept.scored >= thresholds.min_rows and context.low is not None:
            cluster.flags += _raised(
                "context_reliance", "occlusion", context.excess, context.low, context.high, thresholds, region
            )
        cluster.flags = _mark(cluster.flags, failing)
        added += [f for f in cluster.flags if not _covered(f, class_flags)]
    return sorted(added, key=lambda f: -STATUSES.index(f.status))


def _covered(flag: Flag, class_flags: list[Flag]) -> bool:
    return any(
        c.kind == flag.kind and STATUSES.index(c.status) >= STATUSES.index(flag.status) and c.stands >= flag.stands
        for c in class_flags
    )


def _raised(
    kind: str, method: str, value: float, low: float, high: float, thresholds: Thresholds, cluster: str | None = None
) -> list[Flag]:
    """The flag a rate raises when the low end of its interval reaches the kind's fail or warn rate."""
    for status in ("fail", "warn"):
        threshold = thresholds.rate_threshold(kind, status)
        if low >= threshold:
            return [Flag(kind, status, method, value, threshold, low, high, cluster)]
    return []


def assess(
    run: RunData, thresholds: Thresholds, cluster_method: str = "consensus", failing: frozenset[str] = frozenset()
) -> list[ClassResult]:
    """One result per model class and explained target kind, sorted fail -> warn -> pass.

    Each judged class's maps are clustered into strategies (``cluster_method``: a method or the
    consensus). Flags raised only by methods in ``failing`` (the sanity check's) do not stand."""
    pairs = counted_pairs(run.proportional)
    rows = run.rows
    flags = indicators(rows, thresholds, pairs)
    maps = strategy_maps(run, cluster_method, GRID)
    results = []
    for kind in run.target_kinds:
        same_kind = rows["target_kind"].eq(kind)
        in_kind = rows[same_kind]
        for label, name in enumerate(run.classes):
            mask = run.class_rows(label, name, kind)
            rng = np.random.default_rng([BOOTSTRAP_SEED, label, run.target_kinds.index(kind)])
            stats = summarize(rows[mask], flags[mask], thresholds, rng)
            own = mask[same_kind]
            bases = base_rates(in_kind, label, ~own, thresholds, rng)
            stats.reliance = reliance(in_kind, own, bases, thresholds, rng)
            result = ClassResult(label, name, kind, stats, judge(stats, thresholds, pairs, failing))
            result.judged = stats.scored >= thresholds.min_rows
            if result.judged:
                result.strategies = class_strategies(
                    in_kind,
                    own,
                    bases,
                    label,
                    flags[same_kind],
                    maps[same_kind.to_numpy()],
                    cluster_method,
                    thresholds,
                    run.metadata_columns,
                    seed=BOOTSTRAP_SEED,
                )
                result.cluster_flags = judge_clusters(result.strategies, result.flags, thresholds, failing)
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
