"""The flag rules' thresholds, with their defaults and why.

A row *disagrees* for a method pair when the Spearman rank correlation of the two maps is below
``agreement_min``; it disagrees *overall* when the mean correlation over the counted pairs is.
A row is *off-object* for a method when less than ``energy_min`` of the map's mass lies on the
object mask and less than ``lift_min`` times what a map spread evenly over the image would put
there (``mask_area``, the mask's share of the image). A class gets a flag when the share of such
rows is high beyond sampling noise: the lower end of its bootstrap confidence interval
(resampling lesion groups) reaches the warn or fail rate. A class is *context-reliant* when
its correctly predicted images keep the class with the object hidden more often than other
classes' images fall into it (the base rate): the same rule applies to that excess.

Defaults, and why:

* ``agreement_min = 0.5``: below 0.5 two maps rank the image's regions only weakly alike; the
  three methods share activations, so on a sound model they correlate far above it.
* ``energy_min = 0.5``: less than half of the explanation on the object means the model looks
  mostly elsewhere;
* ``lift_min = 1.25``: ...unless the map still clearly favours the object: at least 25% more
  mass on it than a map spread evenly over the image would put there. A 7x7 map upsampled to the
  image spills around a small lesion, so a map centred on a lesion that covers 15% of the image
  may hold only 30% of its mass there: twice the even share, on the object. A map drawn to a
  corner sticker sits at or below the even share. (On the demo's data, 4x4 maps: clean classes
  lift 1.6-1.9 at the median, the shortcut class 1.0-1.1.) Only objects smaller than
  ``energy_min / lift_min`` (40%) of the image are affected.
* ``*_warn = 0.25``: a quarter of a class's images is a pattern worth a look, not a few hard cases.
* ``*_fail = 0.5``: half or more means the class's explanations are dominated by it.
* ``context_reliance_warn = 0.25`` and ``context_reliance_fail = 0.5``, on the excess of the
  class's kept rate over its base rate: with the object hidden, a quarter of the class's
  correct answers survive beyond the model's fallback, so a quarter of them rest on something
  other than the object (a partial shortcut); half or more, the class is mostly answered from
  its context. Unlike off-object, this tests the model, not the map, so it holds at any map
  resolution.
* ``cluster_share_min = 0.1``, ``clusters_max = 6``, ``cluster_floor = 5``: a class's maps are
  split into at most 6 strategy clusters (:mod:`audit.report.clusters`), clusters of fewer
  than 5 images are pooled as "other", and a cluster holding at least 10% of its class (and
  ``min_rows`` images) is judged by the same rules as a class: a shortcut used by a tenth of a
  class is worth a flag, and fewer images than that say little.
* ``sanity_similarity_max = 0.5``: a method fails the model-randomization sanity check
  (:mod:`audit.explain.sanity`) when its maps after re-initialising the classifier still
  correlate with the trained model's at this median Spearman correlation or more: half the
  ranking of the map's regions survives without the decision, so the map says where features
  fire rather than what the classifier used. Its flags then no longer stand alone.
* ``min_rows = 10``: a class with fewer scored rows is shown but not judged: a bootstrap over a
  handful of images says little.
* ``confidence = 0.95`` and ``bootstrap = 2000`` resamples: the usual interval, stable to about
  0.01 at that many resamples.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from audit.errors import AuditError

FLAG_KINDS = ("low_agreement", "off_object", "context_reliance")


class ThresholdError(AuditError):
    """A threshold that is unknown or out of range."""


HELP = {
    "agreement_min": "a method pair disagrees on an image below this Spearman correlation",
    "energy_min": "an image is off-object below this share of the map on the mask...",
    "lift_min": "...and below this multiple of the mask's share of the image",
    "low_agreement_warn": "warn when this share of a class disagrees",
    "low_agreement_fail": "fail when this share of a class disagrees",
    "off_object_warn": "warn when this share of a class is off-object",
    "off_object_fail": "fail when this share of a class is off-object",
    "context_reliance_warn": "warn when this share of a class's correct images keeps the class with the object "
    "hidden, beyond the base rate",
    "context_reliance_fail": "fail when this share keeps the class with the object hidden, beyond the base rate",
    "cluster_share_min": "strategy clusters holding at least this share of their class are judged",
    "clusters_max": "at most this many strategy clusters per class",
    "cluster_floor": "strategy clusters with fewer images are pooled as other",
    "sanity_similarity_max": "a method fails the sanity check when its maps correlate this much (median "
    "Spearman) with the trained model's after the classifier is re-initialised",
    "min_rows": "classes (and clusters) with fewer scored images are not judged",
    "confidence": "level of the bootstrap confidence intervals",
    "bootstrap": "bootstrap resamples",
}


@dataclass(frozen=True)
class Thresholds:
    agreement_min: float = 0.5
    energy_min: float = 0.5
    lift_min: float = 1.25
    low_agreement_warn: float = 0.25
    low_agreement_fail: float = 0.5
    off_object_warn: float = 0.25
    off_object_fail: float = 0.5
    context_reliance_warn: float = 0.25
    context_reliance_fail: float = 0.5
    cluster_share_min: float = 0.1
    clusters_max: int = 6
    cluster_floor: int = 5
    sanity_similarity_max: float = 0.5
    min_rows: int = 10
    confidence: float = 0.95
    bootstrap: int = 2000

    def __post_init__(self) -> None:
        for name in ("energy_min", *(f"{kind}_{status}" for kind in FLAG_KINDS for status in ("warn", "fail"))):
            _require(0 <= getattr(self, name) <= 1, f"{name} must be in [0, 1], got {getattr(self, name)}")
        _require(-1 <= self.agreement_min <= 1, f"agreement_min must be in [-1, 1], got {self.agreement_min}")
        _require(self.lift_min >= 0, f"lift_min must be >= 0, got {self.lift_min}")
        for kind in FLAG_KINDS:
            warn, fail = getattr(self, f"{kind}_warn"), getattr(self, f"{kind}_fail")
            _require(warn <= fail, f"{kind}_warn ({warn}) must not exceed {kind}_fail ({fail})")
        _require(
            -1 <= self.sanity_similarity_max <= 1,
            f"sanity_similarity_max must be in [-1, 1], got {self.sanity_similarity_max}",
        )
        _require(self.min_rows >= 1, f"min_rows must be >= 1, got {self.min_rows}")
        _require(0 <= self.cluster_share_min <= 1, f"cluster_share_min must be in [0, 1], got {self.cluster_share_min}")
        _require(1 <= self.clusters_max <= 20, f"clusters_max must be in [1, 20], got {self.clusters_max}")
        _require(self.cluster_floor >= 2, f"cluster_floor must be >= 2, got {self.cluster_floor}")
        _require(0 < self.confidence < 1, f"confidence must be in (0, 1), got {self.confidence}")
        _require(self.bootstrap >= 100, f"bootstrap must be >= 100 resamples, got {self.bootstrap}")

    def rate_threshold(self, kind: str, status: str) -> float:
        return getattr(self, f"{kind}_{status}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Thresholds:
        """Validated: unknown keys and values of the wrong type are errors that name the key."""
        types = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(data) - set(types))
        if unknown:
            raise ThresholdError(f"unknown thresholds: {', '.join(unknown)} (known: {', '.join(types)})")
        clean = {}
        for name, value in data.items():
            wanted = int if types[name] == "int" else float
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or (wanted is int and value != int(value))
            ):
                raise ThresholdError(f"threshold {name} must be {'an integer' if wanted is int else 'a number'}")
            clean[name] = wanted(value)
        return cls(**clean)

    def updated(self, **changes: float | int | None) -> Thresholds:
        """A copy with the changes that are not None."""
        return Thresholds.from_dict({**self.to_dict(), **{k: v for k, v in changes.items() if v is not None}})


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ThresholdError(message)
