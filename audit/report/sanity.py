"""The report's reading of the model-randomization sanity check (``sanity.json``, see
:mod:`audit.explain.sanity`): which methods pass, and which flags therefore stand.

A method fails when its maps after re-initialising the classifier alone still correlate with the
trained model's at ``sanity_similarity_max`` or more. Its numbers stay in the report, but its
flags no longer stand alone: a flag stands when it comes from a passing method, from the
consensus map when that passes too, from a method pair or the overall agreement with no failing
method in it, or from the model's answers (context reliance). A class whose flags all come from
failing methods is shown as not confirmed and does not count towards the run's status.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from audit.config import CLUSTER_METHODS
from audit.explain.methods import METHODS
from audit.explain.metrics import METHOD_PAIRS
from audit.explain.sanity import SANITY_FILE, SANITY_METHODS, verdicts
from audit.report.figures import method_title

if TYPE_CHECKING:
    from audit.report.load import RunData

PAIRS = {f"{a}_{b}": (a, b) for a, b in METHOD_PAIRS}


@dataclass(frozen=True)
class SanityView:
    images: int
    seeds: list[int]
    steps: list[dict]  # {"randomized": [module names], "similarity": {method: float | None}}
    verdict: dict[str, str]  # method -> pass | fail
    threshold: float
    guided_images: int = 0
    notes: dict[str, str] = field(default_factory=dict)
    seconds: float | None = None
    error: str | None = None

    @property
    def failing(self) -> frozenset[str]:
        return frozenset(m for m, v in self.verdict.items() if v == "fail")

    def to_dict(self) -> dict:
        if self.error:
            return {"error": self.error}
        return {
            "images": self.images,
            "seeds": self.seeds,
            "guided_images": self.guided_images,
            "threshold": self.threshold,
            "steps": self.steps,
            "verdict": self.verdict,
            "notes": self.notes,
            "seconds": self.seconds,
        }


def read_sanity(run_dir: Path, threshold: float) -> SanityView | None:
    """The run's sanity check judged at ``threshold``; None for a run without one."""
    path = Path(run_dir) / SANITY_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if "error" in data:
            return SanityView(0, [], [], {}, threshold, error=str(data["error"]))
        steps = [
            {
                "randomized": [str(name) for name in step["randomized"]],
                "similarity": {m: step["similarity"].get(m) for m in SANITY_METHODS if m in step["similarity"]},
            }
            for step in data["steps"]
        ]
        return SanityView(
            images=int(data["images"]),
            seeds=[int(s) for s in data["seeds"]],
            steps=steps,
            verdict=verdicts(steps, threshold),
            threshold=threshold,
            guided_images=int(data.get("guided_images", 0)),
            notes=dict(data.get("notes") or {}),
            seconds=data.get("seconds"),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return SanityView(0, [], [], {}, threshold, error=f"{SANITY_FILE} cannot be read: {exc}")


def stands(method: str, failing: frozenset[str]) -> bool:
    """Whether a flag raised by ``method`` (a method, ``consensus``, a pair ``a_b``, ``all`` or
    ``occlusion``) stands on its own, given the methods that failed the sanity check."""
    if not failing or method == "occlusion":
        return True
    if method == "all":
        return not (failing & set(METHODS))
    parts = PAIRS.get(method, (method,))
    return not (set(parts) & failing)


def failing_methods(run_dir: Path, threshold: float) -> frozenset[str]:
    """The methods of a run that failed its sanity check at ``threshold`` (none without a check)."""
    view = read_sanity(run_dir, threshold)
    return view.failing if view is not None else frozenset()


def trusted_cluster_method(run: RunData, failing: frozenset[str]) -> tuple[str, str | None]:
    """The run's cluster method, or, when it failed the sanity check, the first of the consensus,
    CAM, Grad-CAM and Grad-CAM++ that passed, with a note that says so."""
    configured = run.cluster_method
    if configured not in failing:
        return configured, None
    has_cam = bool(run.info["model"].get("cam_head"))
    passing = [m for m in CLUSTER_METHODS if m not in failing and (m != "cam" or has_cam)]
    if not passing:
        return configured, None
    return passing[0], (
        f"strategy clusters use {method_title(passing[0])} maps: {method_title(configured)} failed the sanity check"
    )
