"""Hand-made run directories for the report tests: the explanations table `audit run` writes,
with scores chosen by the test, so aggregation and flags have known answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from audit.explain.metrics import LOCALIZED, METHOD_PAIRS
from audit.pipeline.schema import MAP_COLUMNS, explanation_schema, to_table

MAP_SHAPE = (3, 4)


def score_row(image_id: str, label: int, classes: list[str], **values) -> dict:
    """One ok row: agreement 0.9 and energy 0.8 everywhere unless ``values`` say otherwise.

    ``agreement=x`` sets every pair's Spearman, ``energy=x`` every method's energy in mask."""
    agreement = values.pop("agreement", 0.9)
    energy = values.pop("energy", 0.8)
    rng = np.random.default_rng(abs(hash(image_id)) % 2**32)
    h, w = MAP_SHAPE
    row = {
        "image_id": image_id,
        "label": label,
        "label_name": classes[label],
        "target": label,
        "target_kind": "pred",
        "pred": label,
        "prob": 0.9,
        "target_prob": 0.9,
        "correct": True,
        "status": "ok",
        "map_h": h,
        "map_w": w,
        "mask_source": "estimated",
        "mask_area": 0.3,
        "group": None,
        "path": f"/nonexistent/{image_id}.jpg",
        "mask_path": None,
        "source_row": 0,
    }
    for column in MAP_COLUMNS:
        row[column] = rng.random(h * w).astype(np.float16).tolist()
    for a, b in METHOD_PAIRS:
        row[f"agree_spearman_{a}_{b}"] = agreement
        row[f"agree_topk_iou_{a}_{b}"] = agreement
    for m in LOCALIZED:
        row[f"energy_in_mask_{m}"] = energy
        row[f"pointing_hit_{m}"] = energy >= 0.5 if energy is not None else None
        row[f"iou_{m}"] = energy
    row.update(values)
    return row


def class_rows(
    label: int, n: int, classes: list[str], off: int = 0, low: int = 0, prefix: str = "", **values
) -> list[dict]:
    """``n`` rows of one class: the first ``off`` off-object (energy 0.1), the next ``low``
    low-agreement (Spearman 0.1), the rest clean."""
    rows = []
    for i in range(n):
        energy = 0.1 if i < off else 0.8
        agreement = 0.1 if off <= i < off + low else 0.9
        image_id = f"{prefix}{classes[label]}{i}"
        rows.append(score_row(image_id, label, classes, energy=energy, agreement=agreement, **values))
    return rows


def error_row(image_id: str, label_name: str, stage: str, error: str, **values) -> dict:
    return {
        "image_id": image_id,
        "label_name": label_name,
        "target_kind": "pred",
        "status": "error",
        "error_stage": stage,
        "error": error,
        "path": f"/nonexistent/{image_id}.jpg",
        "source_row": 0,
        **values,
    }


def write_run(
    run_dir: Path,
    rows: list[dict],
    classes: list[str],
    proportional: bool = False,
    metadata: dict[str, pa.DataType] | None = None,
    input_size: tuple[int, int] = (48, 64),
    thresholds: dict | None = None,
    model_sha: str = "0" * 64,
    map_shape: tuple[int, int] = MAP_SHAPE,
) -> Path:
    """A run directory holding ``rows`` in one explanations file, and a run.json that describes it."""
    manifest_fields = [
        pa.field("image_id", pa.string()),
        pa.field("path", pa.string()),
        pa.field("label", pa.int64()),
        pa.field("label_name", pa.string()),
        pa.field("mask_path", pa.string()),
        pa.field("group", pa.string()),
        pa.field("source_row", pa.int64()),
        *(pa.field(name, dtype) for name, dtype in (metadata or {}).items()),
    ]
    schema = explanation_schema(pa.schema(manifest_fields), with_boxes=False)
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    (run_dir / "explanations").mkdir(parents=True, exist_ok=True)
    pq.write_table(to_table(columns, schema), run_dir / "explanations" / "part-0.parquet")
    ok = sum(r.get("status") == "ok" for r in rows)
    info = {
        "run_id": run_dir.name,
        "status": "complete",
        "started": "2026-11-22T10:00:00+00:00",
        "config": {"dataset": "synthetic", "targets": "pred", "masks": "auto", "thresholds": thresholds or {}},
        "versions": {"cam-audit": "0.1.0", "torch": "2.11.0"},
        "model": {
            "checkpoint": "/models/model.pt",
            "sha256": model_sha,
            "arch": "resnet18",
            "classes": classes,
            "input_size": list(input_size),
            "target_layer": "layer4",
            "feature_shape": [512, *map_shape],
            "cam_head": "fc",
            "cam_note": None,
            "gradcam_proportional_to_cam": proportional,
        },
        "dataset": {"name": "synthetic", "root": "/data", "fingerprint": "f" * 64, "images": len(rows), "rejected": 0},
        "counts": {"rows": len(rows), "ok": ok, "errors": len(rows) - ok},
        "timings": {"seconds": 12.5, "rows_per_second": 3.2},
    }
    (run_dir / "run.json").write_text(json.dumps(info), encoding="utf-8")
    return run_dir


def frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows)
