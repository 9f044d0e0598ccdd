"""The explanation engine (one forward, one backward, three maps) and the per-row metrics."""

from audit.explain.engine import ExplainEngine, Explanation
from audit.explain.methods import CAM, METHODS, GradCAM, GradCAMPlusPlus, normalize
from audit.explain.metrics import MetricSettings, Scores, score_batch

__all__ = [
    "CAM",
    "METHODS",
    "ExplainEngine",
    "Explanation",
    "GradCAM",
    "GradCAMPlusPlus",
    "MetricSettings",
    "Scores",
    "normalize",
    "score_batch",
]
