"""``audit bench report``: how long the report stage takes on a run of a given size.

Writes a run directory as ``audit run`` would (run.json and one explanations file in the run's
schema) of ``rows`` images over the seven HAM10000 classes, 7x7 maps at a 224 input, lesion
groups of two photos, a metadata column, and in one class a corner shortcut on a third of its
images (maps on the corner, off-object, kept with the object hidden): the report has real work
in every part (bootstraps, base rates, strategy clusters, the gallery and the figures). Then
times :func:`audit.report.build_report` on it, start to finish.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from audit.data.ham10000 import CLASSES
from audit.explain.evidence import FAITHFUL
from audit.explain.methods import METHODS
from audit.explain.metrics import LOCALIZED, METHOD_PAIRS
from audit.pipeline.schema import explanation_schema, to_table

MAP_SIDE = 7
SHORTCUT_CLASS = CLASSES.index("df")
FALLBACK_CLASS = CLASSES.index("nv")


@dataclass
class ReportBenchResult:
    rows: int
    classes: int
    seconds: float
    rows_per_second: float
    html_bytes: int
    status: str
    cluster_flags: int

    def to_dict(self) -> dict:
        return asdict(self)


def bench_report(rows: int = 10_000, seed: int = 0, workdir: Path | None = None) -> ReportBenchResult:
    from audit.report import build_report

    with tempfile.TemporaryDirectory(prefix="cam-audit-bench-report-", dir=workdir) as tmp:
        run_dir = write_synthetic_run(Path(tmp) / "run", rows, seed)
        start = time.perf_counter()
        result = build_report(run_dir)
        seconds = time.perf_counter() - start
    return ReportBenchResult(
        rows=rows,
        classes=len(CLASSES),
        seconds=round(seconds, 2),
        rows_per_second=round(rows / seconds, 1),
        html_bytes=result.html_bytes,
        status=result.status,
        cluster_flags=sum(len(r.cluster_flags) for r in result.results),
    )


def write_synthetic_run(run_dir: Path, rows: int, seed: int = 0) -> Path:
    """A run directory of ``rows`` ok rows (see the module's docstring)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(len(CLASSES), size=rows)
    corner = (labels == SHORTCUT_CLASS) & (rng.random(rows) < 1 / 3)
    ys, xs = np.mgrid[0:MAP_SIDE, 0:MAP_SIDE]
    centre = np.where(corner, MAP_SIDE - 1, 3)[:, None] + rng.normal(0, 0.7, (rows, 2))
    maps = np.exp(-((ys - centre[:, 0, None, None]) ** 2 + (xs - centre[:, 1, None, None]) ** 2) / 3)
    maps = maps + 0.2 * rng.random(maps.shape)
    low, high = maps.min(axis=(1, 2), keepdims=True), maps.max(axis=(1, 2), keepdims=True)
    flat = ((maps - low) / (high - low)).reshape(rows, -1).astype(np.float16)
    energy = np.where(corner, 0.1, 0.8) + rng.normal(0, 0.05, rows)
    columns = {
        "image_id": [f"img{i:06d}" for i in range(rows)],
        "label": labels,
        "label_name": [CLASSES[label] for label in labels],
        "target": labels,
        "target_kind": ["pred"] * rows,
        "pred": labels,
        "prob": rng.uniform(0.5, 1, rows),
        "target_prob": rng.uniform(0.5, 1, rows),
        "correct": [True] * rows,
        "status": ["ok"] * rows,
        "map_h": [MAP_SIDE] * rows,
        "map_w": [MAP_SIDE] * rows,
        **{f"map_{m}": list(flat) for m in METHODS},
        **{
            f"agree_{kind}_{a}_{b}": rng.uniform(0.6, 1, rows)
            for a, b in METHOD_PAIRS
            for kind in ("spearman", "topk_iou")
        },
        **{f"energy_in_mask_{m}": energy for m in LOCALIZED},
        **{f"pointing_hit_{m}": energy > 0.5 for m in LOCALIZED},
        **{f"iou_{m}": energy for m in LOCALIZED},
        "mask_area": [0.2] * rows,
        "mask_source": ["provided"] * rows,
        "object_hidden_pred": np.where(corner, labels, FALLBACK_CLASS),
        "object_hidden_prob": rng.uniform(0, 1, rows),
        "object_alone_pred": np.where(corner, FALLBACK_CLASS, labels),
        "object_alone_prob": rng.uniform(0, 1, rows),
        **{f"drop_{m}": rng.uniform(0, 0.5, rows) for m in FAITHFUL},
        **{f"increase_{m}": rng.random(rows) < 0.1 for m in FAITHFUL},
        "group": [f"lesion{i // 2}" for i in range(rows)],
        "path": [f"/nonexistent/img{i:06d}.jpg" for i in range(rows)],
        "localization": rng.choice(["back", "face", "trunk", "lower extremity"], rows),
    }
    manifest = pa.schema(
        [("image_id", pa.string()), ("path", pa.string()), ("group", pa.string()), ("localization", pa.string())]
    )
    schema = explanation_schema(manifest, with_boxes=False)
    (run_dir / "explanations").mkdir(parents=True)
    pq.write_table(
        to_table({k: list(v) for k, v in columns.items()}, schema), run_dir / "explanations" / "part-0.parquet"
    )
    info = {
        "run_id": run_dir.name,
        "status": "complete",
        "config": {"dataset": "synthetic", "targets": "pred", "masks": "provided", "thresholds": {}},
        "versions": {},
        "model": {
            "arch": "resnet50",
            "classes": list(CLASSES),
            "input_size": [224, 224],
            "target_layer": "layer4",
            "feature_shape": [2048, MAP_SIDE, MAP_SIDE],
            "gradcam_proportional_to_cam": True,
        },
        "dataset": {"name": "synthetic", "images": rows, "rejected": 0, "fingerprint": "0" * 64, "root": "/"},
    }
    (run_dir / "run.json").write_text(json.dumps(info), encoding="utf-8")
    return run_dir


def format_report_bench(result: ReportBenchResult) -> str:
    return (
        f"report benchmark: {result.rows} rows, {result.classes} classes: {result.seconds:.1f} s "
        f"({result.rows_per_second:.0f} rows/s), report.html {result.html_bytes / 1e6:.1f} MB, "
        f"status {result.status}, {result.cluster_flags} cluster flag(s)"
    )
