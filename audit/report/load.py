"""Read a run directory for the report: run.json and the score columns, never a map unless asked.

The explanations table is read column by column: aggregation needs the scalar scores only;
the class-mean heatmaps and the gallery read the map columns, the gallery for its few rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from audit.data.manifest import BOX_COLUMNS
from audit.errors import AuditError
from audit.explain.methods import METHODS
from audit.history import read_run_info, resolve_run
from audit.pipeline.schema import (
    AGREEMENT_COLUMNS,
    EVIDENCE_COLUMNS,
    LOC_DELTA_COLUMNS,
    LOCALIZATION_COLUMNS,
    MAP_COLUMNS,
)

OUTPUT_DIR = "explanations"

ROW_COLUMNS = (
    "image_id",
    "label",
    "label_name",
    "target",
    "target_kind",
    "pred",
    "prob",
    "target_prob",
    "correct",
    "status",
    "error_stage",
    "error",
    "mask_source",
    "mask_area",
    "notes",
    "group",
    "path",
    "mask_path",
    *AGREEMENT_COLUMNS,
    *LOCALIZATION_COLUMNS,
    *EVIDENCE_COLUMNS,  # absent in runs made before the evidence existed: loaded as nulls
)
# Columns of the run itself and of the manifest's plumbing: everything else is metadata to slice by.
NOT_METADATA = {
    *ROW_COLUMNS,
    *MAP_COLUMNS,
    *LOC_DELTA_COLUMNS,
    *BOX_COLUMNS,
    "map_h",
    "map_w",
    "source_row",
    "kinds",
    "row_index",
}


class ReportInputError(AuditError):
    """A folder that is not a readable run directory."""


@dataclass
class RunData:
    run_dir: Path
    info: dict
    rows: pd.DataFrame  # one row per image x target: scores, status and metadata, no maps
    metadata_columns: list[str]

    @property
    def classes(self) -> list[str]:
        return list(self.info["model"]["classes"])

    @property
    def target_kinds(self) -> list[str]:
        return [k for k in ("pred", "label") if k in set(self.rows["target_kind"].dropna())] or ["pred"]

    @property
    def proportional(self) -> bool:
        """CAM and Grad-CAM are proportional by construction on this model (run.json says)."""
        return bool(self.info["model"].get("gradcam_proportional_to_cam"))

    def class_rows(self, label: int, label_name: str, target_kind: str) -> pd.Series:
        """Rows of one class and target kind (error rows of the manifest stage carry only a name)."""
        same_class = self.rows["label"].eq(label) | self.rows["label_name"].eq(label_name)
        return self.rows["target_kind"].eq(target_kind) & same_class

    @property
    def cluster_method(self) -> str:
        """The maps the report clusters into strategies: the run's config, else the consensus."""
        return self.info.get("config", {}).get("cluster_method") or "consensus"

    @property
    def map_size(self) -> tuple[int, int] | None:
        """(h, w) of the run's maps at the target layer, from run.json."""
        shape = self.info["model"].get("feature_shape")
        return (int(shape[-2]), int(shape[-1])) if shape and len(shape) >= 2 else None

    @property
    def input_size(self) -> tuple[int, int]:
        h, w = self.info["model"]["input_size"]
        return int(h), int(w)


def load_run(run_dir: Path | str) -> RunData:
    """A run's facts and score columns; ``run_dir`` may be a ``latest`` or ``baseline`` pointer, or a URI."""
    run_dir = resolve_run(run_dir)
    info = read_run_info(run_dir)
    dataset = _dataset(run_dir)
    names = set(dataset.schema.names)
    metadata = [n for n in dataset.schema.names if n not in NOT_METADATA]
    wanted = [c for c in (*ROW_COLUMNS, *BOX_COLUMNS, *metadata) if c in names]
    rows = dataset.to_table(columns=wanted).to_pandas()
    for column in ROW_COLUMNS:
        if column not in rows:
            rows[column] = None
    return RunData(run_dir, info, rows, metadata)


def read_maps(run_dir: Path, image_ids: list[str] | None = None) -> pa.Table:
    """``image_id``, ``label``, ``target_kind``, ``status``, ``map_h``, ``map_w`` and the map columns,
    for every row or only for ``image_ids``."""
    dataset = _dataset(run_dir)
    filter_ = pc.field("image_id").isin(image_ids) if image_ids is not None else None
    columns = ["image_id", "label", "target_kind", "status", "map_h", "map_w", *MAP_COLUMNS]
    return dataset.to_table(columns=columns, filter=filter_)


def map_array(table: pa.Table, method: str, index: int) -> np.ndarray | None:
    """One row's map as a float32 (h, w) array, or None where the method has none."""
    values = table.column(f"map_{method}")[index].as_py()
    if values is None:
        return None
    h, w = table.column("map_h")[index].as_py(), table.column("map_w")[index].as_py()
    return np.asarray(values, dtype=np.float32).reshape(h, w)


def class_mean_maps(run_dir: Path) -> dict[tuple[int, str], dict[str, np.ndarray]]:
    """Mean map of each method per (label, target_kind), over ok rows, streamed file by file."""
    sums: dict[tuple[int, str, str], np.ndarray] = {}
    counts: dict[tuple[int, str, str], int] = {}
    columns = ["label", "target_kind", "status", "map_h", "map_w", *MAP_COLUMNS]
    for batch in _dataset(run_dir).to_batches(columns=columns, filter=pc.field("status") == "ok"):
        if batch.num_rows == 0:
            continue
        frame = batch.select(["label", "target_kind", "map_h", "map_w"]).to_pandas()
        for method in METHODS:
            column = batch.column(f"map_{method}")
            for (label, kind, h, w), index in frame.groupby(["label", "target_kind", "map_h", "map_w"]).groups.items():
                picked = column.take(pa.array(np.asarray(index)))
                picked = picked.filter(picked.is_valid())
                if len(picked) == 0:
                    continue
                stacked = picked.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, h, w)
                key = (int(label), str(kind), method)
                if key in sums and sums[key].shape != (h, w):
                    continue  # one run has one map size; anything else is not averaged in
                sums[key] = sums.get(key, 0) + stacked.sum(axis=0)
                counts[key] = counts.get(key, 0) + len(stacked)
    means: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for (label, kind, method), total in sums.items():
        means.setdefault((label, kind), {})[method] = total / counts[(label, kind, method)]
    return means


def strategy_maps(run: RunData, method: str, grid: int) -> np.ndarray:
    """(len(run.rows), grid * grid) float32: each row's map of ``method`` (or the consensus of
    the methods the run has) upsampled bilinearly to a grid x grid square over the input frame,
    in the order of ``run.rows``; NaN where a row has no map (error rows)."""
    import torch

    from audit.explain.metrics import consensus, upsample

    table = _dataset(run.run_dir).to_table(columns=["image_id", "map_h", "map_w", *MAP_COLUMNS])
    if table.column("image_id").to_pylist() != run.rows["image_id"].tolist():
        raise ReportInputError(f"the explanations of {run.run_dir} changed while the report was read")
    out = np.full((table.num_rows, grid * grid), np.nan, dtype=np.float32)
    valid = table.column("map_h").is_valid().to_numpy(zero_copy_only=False)
    if not valid.any():
        return out
    h, w = (int(table.column(c).filter(table.column(c).is_valid())[0].as_py()) for c in ("map_h", "map_w"))
    maps = {}
    for name in METHODS:
        column = table.column(f"map_{name}").filter(pa.array(valid))
        if column.null_count == 0:
            flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float32)
            maps[name] = torch.from_numpy(flat.reshape(-1, h, w))
    if method != "consensus" and method not in maps:
        raise ReportInputError(f"the run has no {method} maps to cluster (see run.json's cam_note)")
    chosen = consensus(maps)[0] if method == "consensus" else maps[method]
    out[valid] = upsample(chosen, (grid, grid)).flatten(1).numpy()
    return out


def _dataset(run_dir: Path) -> ds.Dataset:
    folder = Path(run_dir) / OUTPUT_DIR
    files = sorted(str(f) for f in folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        raise ReportInputError(f"{run_dir} has no explanations yet ({folder} holds no Parquet file)")
    try:
        return ds.dataset(files, format="parquet")
    except (pa.ArrowInvalid, OSError) as exc:
        raise ReportInputError(f"cannot read the explanations of {run_dir}: {exc}") from exc
