"""`audit compare`: a run against a baseline run, class by class, under one set of thresholds.

Both runs are judged with the same thresholds (the newer run's), so a change of thresholds is
never mistaken for a change of the model. For each class and target kind found in both runs:

* every judged rate (low agreement overall and per counted pair, off-object per method and for
  the consensus, context reliance's excess over its base rate) is shown as baseline -> run
  with its delta; a rate absent from one run (made before the evidence existed) is shown as
  absent, never as zero; a rate that rose by more than ``tolerance`` (absolute, 0.05 = 5
  points of the class's images) is a *regression*;
* flags are matched by kind and method (and, for a strategy cluster's flag, the region the
  cluster points at): *new* (raised now, not before), *resolved* (the other way round),
  *escalated* (warn -> fail) and *eased* (fail -> warn).

Only what stands is compared: the rates and flags of a method that failed either run's sanity
check (:mod:`audit.report.sanity`) are shown in each run's report but neither regress nor raise.

A class's comparison status is ``fail`` when it regressed, ``warn`` when it has new or escalated
flags within the tolerance, else ``pass``; a class with fewer than ``min_rows`` scored rows in
either run is shown but not judged. Runs of different models, class lists or datasets are
compared where they overlap, and each difference is stated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from audit.config import DEFAULT_TOLERANCE
from audit.explain.metrics import LOCALIZED
from audit.history import location, run_precision
from audit.report.aggregate import counted_pairs
from audit.report.figures import kind_title, method_title
from audit.report.flags import FLAG_ORDER, STATUSES, ClassResult, Flag, assess, worst
from audit.report.load import ReportInputError, RunData
from audit.report.sanity import failing_methods, stands, trusted_cluster_method
from audit.report.thresholds import Thresholds

COMPARE_FORMAT = "cam-audit-compare/1"
COMPARE_FILE = "compare.json"


@dataclass(frozen=True)
class RateChange:
    kind: str  # low_agreement | off_object | context_reliance
    method: str
    baseline: float | None
    run: float | None

    @property
    def delta(self) -> float | None:
        return None if self.baseline is None or self.run is None else self.run - self.baseline

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "method": self.method,
            "baseline": _round(self.baseline),
            "run": _round(self.run),
            "delta": _round(self.delta),
        }


@dataclass
class ClassComparison:
    label_name: str
    target_kind: str
    baseline: ClassResult
    run: ClassResult
    changes: list[RateChange]
    regressed: list[RateChange] = field(default_factory=list)
    new_flags: list[Flag] = field(default_factory=list)
    resolved_flags: list[Flag] = field(default_factory=list)
    escalated: list[Flag] = field(default_factory=list)
    eased: list[Flag] = field(default_factory=list)

    @property
    def judged(self) -> bool:
        return self.baseline.judged and self.run.judged

    @property
    def status(self) -> str:
        if self.regressed:
            return "fail"
        return "warn" if self.new_flags or self.escalated else "pass"

    def regression_lines(self) -> list[str]:
        """One phrase per rate kind: the overall rate (or the largest rise) and the other methods."""
        lines = []
        for kind in FLAG_ORDER:
            rises = [r for r in self.regressed if r.kind == kind]
            if rises:
                lead = max(rises, key=lambda r: (r.method in ("all", "consensus"), r.delta))
                others = [method_title(r.method) for r in rises if r is not lead]
                also = f"; also {', '.join(others)}" if others else ""
                lines.append(f"{rate_name(kind, lead.method)} {_pct(lead.baseline)} -> {_pct(lead.run)}{also}")
        return lines

    def flag_lines(self) -> list[str]:
        """New, escalated, resolved and eased flags, one phrase per change, kind and status."""
        lines = []
        for change, flags in (
            ("new", self.new_flags),
            ("escalated", self.escalated),
            ("resolved", self.resolved_flags),
            ("eased", self.eased),
        ):
            groups: dict[tuple[str, str, str | None], list[str]] = {}
            for flag in flags:
                groups.setdefault((flag.kind, flag.status, flag.cluster), []).append(method_title(flag.method))
            for (kind, status, cluster), methods in groups.items():
                what = kind_title(kind) if cluster is None else f"{kind_title(kind)} of the cluster at the {cluster}"
                level = f" {status}" if change == "new" else ""
                lines.append(f"{change}{level} {what} ({', '.join(methods)})")
        return lines

    def to_dict(self) -> dict:
        return {
            "label_name": self.label_name,
            "target_kind": self.target_kind,
            "status": self.status,
            "regressed": bool(self.regressed),
            "judged": self.judged,
            "baseline": {"status": self.baseline.status, "n": self.baseline.stats.n},
            "run": {"status": self.run.status, "n": self.run.stats.n},
            "rates": [c.to_dict() for c in self.changes],
            "regressions": [c.to_dict() for c in self.regressed],
            "new_flags": [f.to_dict() for f in self.new_flags],
            "resolved_flags": [f.to_dict() for f in self.resolved_flags],
            "escalated_flags": [f.to_dict() for f in self.escalated],
            "eased_flags": [f.to_dict() for f in self.eased],
        }


@dataclass
class Comparison:
    baseline_id: str
    run_id: str
    baseline_dir: str
    tolerance: float
    thresholds: Thresholds
    classes: list[ClassComparison]
    only_in_baseline: list[str]
    only_in_run: list[str]
    differences: list[str]

    @property
    def status(self) -> str:
        return worst(c.status for c in self.classes)

    def reaches(self, level: str) -> bool:
        return STATUSES.index(self.status) >= STATUSES.index(level)

    def to_dict(self) -> dict:
        return {
            "format": COMPARE_FORMAT,
            "baseline_run_id": self.baseline_id,
            "run_id": self.run_id,
            "baseline_dir": self.baseline_dir,
            "status": self.status,
            "tolerance": self.tolerance,
            "thresholds": self.thresholds.to_dict(),
            "regressed": [f"{c.label_name} ({c.target_kind})" for c in self.classes if c.regressed],
            "differences": self.differences,
            "only_in_baseline": self.only_in_baseline,
            "only_in_run": self.only_in_run,
            "classes": [c.to_dict() for c in self.classes],
        }

    def headline(self) -> list[str]:
        """Plain lines: the verdict, then one line per class that changed."""
        regressed = sum(bool(c.regressed) for c in self.classes)
        lines = [
            f"compared with {self.baseline_id}: {self.status.upper()}, {regressed} of {len(self.classes)} "
            f"class x target results regressed beyond {100 * self.tolerance:.0f} points"
        ]
        for c in self.classes:
            parts = c.regression_lines() + c.flag_lines()
            if parts:
                what = "regressed" if c.regressed else "changed"
                lines.append(f"  {c.label_name} ({c.target_kind}) {what}: {'; '.join(parts)}")
        lines += [f"  note: {d}" for d in self.differences]
        return lines


def compare_runs(
    baseline: RunData,
    run: RunData,
    thresholds: Thresholds,
    tolerance: float = DEFAULT_TOLERANCE,
    run_results: list[ClassResult] | None = None,
    cluster_method: str | None = None,
) -> Comparison:
    """Compare ``run`` with ``baseline``; ``run_results`` are the run's own results when already assessed.
    Both runs' maps are clustered with ``cluster_method`` (default: the run's config, else the consensus;
    the first method that passed the run's sanity check where that one failed)."""
    if not 0 <= tolerance <= 1:
        raise ValueError(f"tolerance must be in [0, 1], got {tolerance}")
    limit = thresholds.sanity_similarity_max
    failing = failing_methods(run.run_dir, limit)
    if cluster_method is None:
        cluster_method, _ = trusted_cluster_method(run, failing)
    before_failing = failing_methods(baseline.run_dir, limit)
    before = {(r.label_name, r.target_kind): r for r in assess(baseline, thresholds, cluster_method, before_failing)}
    after = {
        (r.label_name, r.target_kind): r for r in (run_results or assess(run, thresholds, cluster_method, failing))
    }
    pairs = tuple(p for p in counted_pairs(run.proportional) if p in counted_pairs(baseline.proportional))
    rates = [("low_agreement", m) for m in ("all", *pairs)] + [("off_object", m) for m in LOCALIZED]
    rates.append(("context_reliance", "occlusion"))
    rates = [(kind, method) for kind, method in rates if stands(method, failing | before_failing)]
    classes = [_compare_class(before[key], after[key], rates, tolerance) for key in after if key in before]
    if not classes:
        raise ReportInputError(
            f"nothing to compare: runs {baseline.run_dir.name} and {run.run_dir.name} share no class and target kind"
        )
    classes.sort(key=lambda c: (-STATUSES.index(c.status), c.target_kind != "pred", c.run.label))
    return Comparison(
        baseline_id=baseline.info.get("run_id", baseline.run_dir.name),
        run_id=run.info.get("run_id", run.run_dir.name),
        baseline_dir=location(baseline.run_dir),
        tolerance=tolerance,
        thresholds=thresholds,
        classes=classes,
        only_in_baseline=[_key(k) for k in before if k not in after],
        only_in_run=[_key(k) for k in after if k not in before],
        differences=differences(baseline, run, thresholds),
    )


def _compare_class(
    before: ClassResult, after: ClassResult, rates: list[tuple[str, str]], tolerance: float
) -> ClassComparison:
    changes = [
        RateChange(kind, method, judged_value(before, kind, method), judged_value(after, kind, method))
        for kind, method in rates
    ]
    result = ClassComparison(after.label_name, after.target_kind, before, after, changes)
    if result.judged:
        result.regressed = [c for c in changes if c.delta is not None and c.delta > tolerance + 1e-12]
    old = {(f.kind, f.method, f.cluster): f for f in (*before.flags, *before.cluster_flags) if f.stands}
    new = {(f.kind, f.method, f.cluster): f for f in (*after.flags, *after.cluster_flags) if f.stands}
    result.new_flags = [f for key, f in new.items() if key not in old]
    result.resolved_flags = [f for key, f in old.items() if key not in new]
    kept = [(old[key], f) for key, f in new.items() if key in old]
    result.escalated = [f for was, f in kept if (was.status, f.status) == ("warn", "fail")]
    result.eased = [f for was, f in kept if (was.status, f.status) == ("fail", "warn")]
    return result


def judged_value(result: ClassResult, kind: str, method: str) -> float | None:
    """The value a flag of this kind and method is judged on; None where the run did not measure it
    (a run made before the evidence existed), so a comparison shows it as absent, never as zero."""
    if kind == "context_reliance":
        context = result.stats.reliance.get("object_hidden")
        return context.excess if context is not None else None
    return result.stats.rates[kind][method].value


def differences(baseline: RunData, run: RunData, thresholds: Thresholds) -> list[str]:
    """What differs between the two runs beyond the model's behaviour, in plain sentences."""
    b, r = baseline.info, run.info
    notes = []
    bm, rm = b.get("model", {}), r.get("model", {})
    if bm.get("sha256") != rm.get("sha256"):
        notes.append(
            f"the models differ: {bm.get('arch')} {str(bm.get('sha256'))[:12]} -> "
            f"{rm.get('arch')} {str(rm.get('sha256'))[:12]}"
        )
    gone = [c for c in baseline.classes if c not in run.classes]
    added = [c for c in run.classes if c not in baseline.classes]
    if gone or added:
        notes.append(
            "the class lists differ"
            + (f"; only the baseline has {', '.join(gone)}" if gone else "")
            + (f"; only this run has {', '.join(added)}" if added else "")
            + ": those classes are not compared"
        )
    bd, rd = b.get("dataset", {}), r.get("dataset", {})
    if bd.get("fingerprint") != rd.get("fingerprint"):
        notes.append(
            f"the datasets differ: {bd.get('name')} with {bd.get('images')} images -> "
            f"{rd.get('name')} with {rd.get('images')} images"
        )
    if baseline.target_kinds != run.target_kinds:
        notes.append(
            f"the explained targets differ ({', '.join(baseline.target_kinds)} -> {', '.join(run.target_kinds)}): "
            "only the shared ones are compared"
        )
    if baseline.proportional != run.proportional:
        notes.append(
            "CAM and Grad-CAM are proportional in only one of the runs: that pair is left out of the deltas, "
            "and overall low agreement averages different pairs in the two runs"
        )
    bc, rc = b.get("config", {}), r.get("config", {})
    options = ("masks", "evidence", "limit", "gradcampp_eps", "grid", "topk", "delta")
    changed = [k for k in options if bc.get(k) != rc.get(k)]
    changed += [k for k in ("target_layer",) if bm.get(k) != rm.get(k)]
    settled = {"precision": (run_precision(b), run_precision(r))}
    changed += [k for k, (before, after) in settled.items() if before != after]
    if changed:
        values = {k: (bc.get(k, bm.get(k)), rc.get(k, rm.get(k))) for k in changed} | settled
        notes.append(
            "computed with different options: "
            + ", ".join(f"{k} {values[k][0]!r} -> {values[k][1]!r}" for k in changed)
        )
    own = Thresholds.from_dict(bc.get("thresholds") or {})
    if own != thresholds:
        names = [k for k, v in own.to_dict().items() if thresholds.to_dict()[k] != v]
        notes.append(f"the baseline is judged with this run's thresholds, not its own ({', '.join(names)} differ)")
    for name, data in (("baseline", b), ("run", r)):
        if data.get("status") != "complete":
            notes.append(f"the {name} is {data.get('status', 'unknown')}: its rates cover the rows it holds")
    return notes


def _key(key: tuple[str, str]) -> str:
    return f"{key[0]} ({key[1]})"


def rate_name(kind: str, method: str) -> str:
    """``off-object (consensus)``, ``low agreement (gradcam vs gradcampp)``."""
    return f"{kind_title(kind)} ({method_title(method)})"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)
