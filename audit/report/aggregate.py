"""Per-class aggregation of the per-row scores, with confidence intervals by a group bootstrap.

Each ok row gets 0/1 *indicators* (undefined where its score is null):

* ``low_agreement`` for a method pair ``a_b``: ``agree_spearman_a_b < agreement_min``; for
  ``all``: the mean Spearman correlation over the counted pairs ``< agreement_min``;
* ``off_object`` for a method ``m`` (and the consensus map): ``energy_in_mask_m`` below both
  ``energy_min`` and ``lift_min * mask_area``: less than half the map on the object *and* no
  more than a map spread evenly over the image would put there. The second condition keeps a
  small object seen through a coarse map (a 7x7 map upsampled spills around a small lesion)
  from counting as off-object when the map is centred on it.

Evidence by intervention (where the run computed it, :mod:`audit.explain.evidence`):

* context reliance (``object_hidden``) and object sufficiency (``object_alone``): the share
  of a class's correctly predicted rows whose prediction with the object hidden (or alone)
  is still the class (:func:`reliance`, against a base rate: below);
* ``average_drop`` and ``increase`` for each method and the consensus: the Grad-CAM++ paper's
  drop in the target's confidence on ``image * map``, and whether it rose instead.

A *rate* is the share of rows with the indicator among the rows where it is defined (for
``average_drop``, the mean drop). Its confidence interval is a percentile bootstrap that
resamples whole groups (HAM10000's ``lesion_id``: several photos of one lesion are not
independent evidence); a row without a group is its own group.

**Base rates.** An image with its object hidden has nothing left to classify, and a model
then often answers one class (typically the most frequent one): that is a fallback, not a
shortcut. So class c's context reliance is judged against the rate at which *other* classes'
correctly predicted images that lose their class under the same intervention land on c:
:class:`Reliance` holds both and their difference, ``excess = kept - base``, with a percentile
interval from independent group resamples of the two. A shortcut class keeps its class
without its object while other classes' images do not fall into it (excess near 1); the
fallback class keeps its class exactly as often as everyone else lands on it (excess near 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from audit.explain.metrics import LOCALIZED, METHOD_PAIRS
from audit.report.thresholds import Thresholds

ALL_PAIRS = tuple(f"{a}_{b}" for a, b in METHOD_PAIRS)
PROPORTIONAL_PAIR = "cam_gradcam"
RATE_KINDS = ("low_agreement", "off_object")
INTERVENTIONS = ("object_hidden", "object_alone")  # context reliance, object sufficiency
FAITHFULNESS_KINDS = ("average_drop", "increase")
BOOTSTRAP_SEED = 0
_CHUNK = 250  # bootstrap resamples per matrix product: bounds memory on classes of thousands of groups


@dataclass(frozen=True)
class Rate:
    """``hits`` of ``scored`` rows; ``value`` and its interval are None when nothing was scored."""

    hits: float  # a count of rows, or for a mean (average_drop) the sum of the values
    scored: int
    low: float | None = None
    high: float | None = None

    @property
    def value(self) -> float | None:
        return self.hits / self.scored if self.scored else None

    def to_dict(self) -> dict:
        return {"value": _round(self.value), "ci": [_round(self.low), _round(self.high)], "n": self.scored}


@dataclass(frozen=True)
class Reliance:
    """Class c under one intervention: ``kept`` (its correct images still predicted c), ``base``
    (other classes' correct images that lose their class and land on c instead), and
    ``excess = kept - base`` with its interval (None where either is unmeasured)."""

    kept: Rate
    base: Rate
    excess: float | None = None
    low: float | None = None
    high: float | None = None

    def to_dict(self) -> dict:
        return {
            "kept": self.kept.to_dict(),
            "base": self.base.to_dict(),
            "excess": {"value": _round(self.excess), "ci": [_round(self.low), _round(self.high)]},
        }


@dataclass
class GroupStats:
    """Aggregates of one set of rows (a class and target kind, or a slice of one)."""

    n: int
    ok: int
    errors: int
    accuracy: float | None
    rates: dict[str, dict[str, Rate]]  # rates[kind][method or pair]
    energy: dict[str, dict[str, float | None]] = field(default_factory=dict)  # quantiles per method
    agreement: dict[str, dict[str, float | None]] = field(default_factory=dict)  # medians per pair
    reliance: dict[str, Reliance] = field(default_factory=dict)  # per intervention, set by the flag stage

    def evidence(self, kind: str) -> dict[str, Rate]:
        """The rates of one kind of evidence that were measured (``{}`` for a run without it)."""
        return {m: r for m, r in self.rates.get(kind, {}).items() if r.scored}

    @property
    def scored(self) -> int:
        return max((r.scored for rates in self.rates.values() for r in rates.values()), default=0)


def counted_pairs(proportional: bool) -> tuple[str, ...]:
    """The pairs whose agreement is evidence: CAM vs Grad-CAM is not when they are proportional."""
    return tuple(p for p in ALL_PAIRS if not (proportional and p == PROPORTIONAL_PAIR))


def indicators(rows: pd.DataFrame, thresholds: Thresholds, pairs: tuple[str, ...]) -> pd.DataFrame:
    """Float columns ``kind:method`` of 1.0 / 0.0 / NaN (undefined), one row per input row."""
    out = {}
    spearman = {p: _numeric(rows, f"agree_spearman_{p}") for p in ALL_PAIRS}
    for pair in ALL_PAIRS:
        out[f"low_agreement:{pair}"] = _below(spearman[pair], thresholds.agreement_min)
    mean = pd.concat([spearman[p] for p in pairs], axis=1).mean(axis=1, skipna=True) if pairs else None
    out["low_agreement:all"] = _below(mean, thresholds.agreement_min) if mean is not None else np.nan
    chance = thresholds.lift_min * _numeric(rows, "mask_area").fillna(1.0)  # runs without the column: absolute only
    for method in LOCALIZED:
        energy = _numeric(rows, f"energy_in_mask_{method}")
        out[f"off_object:{method}"] = _below(energy, np.minimum(thresholds.energy_min, chance))
    for method in LOCALIZED:
        out[f"average_drop:{method}"] = _numeric(rows, f"drop_{method}")
        out[f"increase:{method}"] = _numeric(rows, f"increase_{method}")
    frame = pd.DataFrame(out, index=rows.index)
    ok = rows["status"].eq("ok")
    return frame.where(ok, np.nan)


def summarize(
    rows: pd.DataFrame, flags: pd.DataFrame, thresholds: Thresholds, rng: np.random.Generator | None = None
) -> GroupStats:
    """Counts, accuracy, rates with intervals, and score distributions of ``rows``.

    ``flags`` holds :func:`indicators` for the same rows."""
    ok = rows["status"].eq("ok")
    correct = rows.loc[ok, "correct"].dropna()
    low, high = group_bootstrap(
        flags.to_numpy(dtype=float), lesion_groups(rows), thresholds.bootstrap, thresholds.confidence, rng
    )
    rates: dict[str, dict[str, Rate]] = {}
    for j, column in enumerate(flags.columns):
        kind, method = column.split(":")
        values = flags[column].dropna()
        rates.setdefault(kind, {})[method] = Rate(float(values.sum()), len(values), _float(low[j]), _float(high[j]))
    return GroupStats(
        n=len(rows),
        ok=int(ok.sum()),
        errors=int((~ok).sum()),
        accuracy=float(correct.astype(bool).mean()) if len(correct) else None,
        rates=rates,
        energy={m: _quantiles(_numeric(rows[ok], f"energy_in_mask_{m}")) for m in LOCALIZED},
        agreement={
            p: {
                "spearman": _median(_numeric(rows[ok], f"agree_spearman_{p}")),
                "topk_iou": _median(_numeric(rows[ok], f"agree_topk_iou_{p}")),
            }
            for p in ALL_PAIRS
        },
    )


def group_bootstrap(
    values: np.ndarray,
    groups: np.ndarray,
    samples: int,
    confidence: float,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of each column's rate (mean of the non-NaN entries), resampling groups.

    ``values``: (N, R) of 0/1/NaN (or any numbers, for a mean). Returns (low, high), each (R,),
    NaN where a column has no value.
    """
    return percentile_interval(resampled_rates(values, groups, samples, rng), confidence)


def resampled_rates(
    values: np.ndarray, groups: np.ndarray, samples: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """(samples, R): each column's rate in group resamples of (N, R) ``values`` (NaN = undefined).

    Each resample draws as many groups as there are, with replacement; the rate of a resample is
    its hits over its scored rows, so large groups weigh as much as their rows."""
    values = np.asarray(values, dtype=float)
    values = values[:, None] if values.ndim == 1 else values
    r = values.shape[1]
    if len(values) == 0:
        return np.full((samples, r), np.nan)
    rng = rng or np.random.default_rng(BOOTSTRAP_SEED)
    codes, uniques = pd.factorize(pd.Series(groups), use_na_sentinel=False)
    g = len(uniques)
    hits = np.zeros((g, r))
    scored = np.zeros((g, r))
    np.add.at(hits, codes, np.nan_to_num(values, nan=0.0))
    np.add.at(scored, codes, ~np.isnan(values))
    resampled = []
    for start in range(0, samples, _CHUNK):
        weights = rng.multinomial(g, np.full(g, 1.0 / g), size=min(_CHUNK, samples - start)).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            resampled.append((weights @ hits) / (weights @ scored))
    return np.concatenate(resampled)


def percentile_interval(rates: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) percentile interval of each column of resampled ``rates``, NaN where none is defined."""
    r = rates.shape[1]
    tail = 100 * (1 - confidence) / 2
    defined = ~np.isnan(rates).all(axis=0)
    low, high = np.full(r, np.nan), np.full(r, np.nan)
    if defined.any():
        low[defined] = np.nanpercentile(rates[:, defined], tail, axis=0)
        high[defined] = np.nanpercentile(rates[:, defined], 100 - tail, axis=0)
    return low, high


@dataclass(frozen=True)
class BaseRate:
    """Under one intervention, the share of other classes' correct images that lose their class
    and land on class c instead: the rate, and its group resamples (for the excess's interval)."""

    rate: Rate
    resampled: np.ndarray


def base_rates(
    rows: pd.DataFrame, label: int, others: pd.Series, thresholds: Thresholds, rng: np.random.Generator
) -> dict[str, BaseRate]:
    """Class ``label``'s base rate under each intervention the run measured, from ``others``: the
    rows of the other classes among ``rows`` (one target kind)."""
    correct = rows["status"].eq("ok") & rows["correct"].eq(True)
    labels = _numeric(rows, "label")
    out = {}
    for intervention in INTERVENTIONS:
        pred = _numeric(rows, f"{intervention}_pred")
        if pred.notna().sum() == 0:
            continue
        lost = correct & others & pred.notna() & pred.ne(labels)
        landed = pred[lost].eq(label).astype(float)
        resampled = resampled_rates(landed.to_numpy(), lesion_groups(rows[lost]), thresholds.bootstrap, rng)[:, 0]
        out[intervention] = BaseRate(_rate(landed, resampled, thresholds.confidence), resampled)
    return out


def reliance(
    rows: pd.DataFrame,
    own: pd.Series,
    bases: dict[str, BaseRate],
    thresholds: Thresholds,
    rng: np.random.Generator | None = None,
) -> dict[str, Reliance]:
    """Context reliance and object sufficiency of the ``own`` rows (a class's, or one strategy
    cluster's, among ``rows`` of one target kind) against their class's ``bases``
    (:func:`base_rates`), for each intervention there."""
    rng = rng or np.random.default_rng(BOOTSTRAP_SEED)
    judged = own & rows["status"].eq("ok") & rows["correct"].eq(True)
    labels = _numeric(rows, "label")
    out = {}
    for intervention, base in bases.items():
        pred = _numeric(rows, f"{intervention}_pred")
        chosen = judged & pred.notna()
        kept = pred[chosen].eq(labels[chosen]).astype(float)
        kept_rates = resampled_rates(kept.to_numpy(), lesion_groups(rows[chosen]), thresholds.bootstrap, rng)[:, 0]
        kept_rate = _rate(kept, kept_rates, thresholds.confidence)
        if kept_rate.value is None:
            out[intervention] = Reliance(kept_rate, base.rate)
            continue
        # where no other image lost its class (or none was drawn), the class is judged against zero
        excess = kept_rates - np.nan_to_num(base.resampled, nan=0.0)
        low, high = percentile_interval(excess[:, None], thresholds.confidence)
        value = kept_rate.value - (base.rate.value or 0.0)
        out[intervention] = Reliance(kept_rate, base.rate, value, _float(low[0]), _float(high[0]))
    return out


def _rate(values: pd.Series, resampled: np.ndarray, confidence: float) -> Rate:
    defined = values.dropna()
    low, high = percentile_interval(resampled[:, None], confidence)
    return Rate(float(defined.sum()), len(defined), _float(low[0]), _float(high[0]))


def metadata_slices(rows: pd.DataFrame, flags: pd.DataFrame, column: str, max_values: int = 12) -> pd.DataFrame:
    """Rates of the ok rows per value of one metadata column: ``value``, ``n``, ``off_object``
    (consensus) and ``low_agreement`` (all). Numbers with many values are cut into quartiles;
    rare categories beyond ``max_values`` are pooled as ``other``."""
    ok = rows["status"].eq("ok")
    values = rows.loc[ok, column]
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().sum() == values.notna().sum() and numeric.nunique() > 8:
        keys = pd.qcut(numeric, 4, duplicates="drop").astype(str).where(numeric.notna(), "missing")
    else:
        keys = values.astype("string").fillna("missing")
        common = keys.value_counts().index[:max_values]
        keys = keys.where(keys.isin(common), "other")
    frame = pd.DataFrame(
        {
            "value": keys.astype(str),
            "off_object": flags.loc[ok, "off_object:consensus"],
            "low_agreement": flags.loc[ok, "low_agreement:all"],
        }
    )
    table = frame.groupby("value", sort=False).agg(
        n=("value", "size"), off_object=("off_object", "mean"), low_agreement=("low_agreement", "mean")
    )
    return table.reset_index().sort_values("n", ascending=False, kind="stable").reset_index(drop=True)


def lesion_groups(rows: pd.DataFrame) -> np.ndarray:
    """Each row's bootstrap group: its `group` (a lesion), or the image itself where it has none."""
    group = rows["group"] if "group" in rows else pd.Series(None, index=rows.index, dtype=object)
    group = group.astype(object).where(group.notna() & group.astype(str).ne(""), None)
    return np.where(group.isna(), "image:" + rows["image_id"].astype(str), "group:" + group.astype(str))


def _numeric(rows: pd.DataFrame, column: str) -> pd.Series:
    if column not in rows:
        return pd.Series(np.nan, index=rows.index, dtype=float)
    return pd.to_numeric(rows[column], errors="coerce").astype(float)


def _below(values: pd.Series, threshold: float | pd.Series) -> pd.Series:
    return (values < threshold).astype(float).where(values.notna(), np.nan)


def _quantiles(values: pd.Series) -> dict[str, float | None]:
    values = values.dropna()
    if values.empty:
        return {"p10": None, "median": None, "p90": None}
    p10, median, p90 = np.quantile(values, [0.1, 0.5, 0.9])
    return {"p10": _round(p10), "median": _round(median), "p90": _round(p90)}


def _median(values: pd.Series) -> float | None:
    values = values.dropna()
    return _round(values.median()) if len(values) else None


def _float(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _round(value: float | None) -> float | None:
    return None if value is None or np.isnan(value) else round(float(value), 4)
