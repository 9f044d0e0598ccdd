"""The explanations table: one row per image x explained target, ok or error, fixed schema.

See ../shared/DESIGN.md (Contracts). Maps are flat row-major float16 lists in [0, 1] at the
target layer's resolution (``map_h`` x ``map_w``), null where a method does not apply (the
reason is in ``notes``). The manifest's own columns (``group``, ``path``, ``mask_path``, box
and metadata columns) follow, so the report can slice and show images without a join.
"""

from __future__ import annotations

import pyarrow as pa

from audit.explain.evidence import FAITHFULNESS_COLUMNS, OCCLUSION_COLUMNS
from audit.explain.methods import METHODS
from audit.explain.metrics import LOCALIZED, METHOD_PAIRS

MAP_COLUMNS = tuple(f"map_{m}" for m in METHODS)
AGREEMENT_COLUMNS = tuple(f"agree_{kind}_{a}_{b}" for a, b in METHOD_PAIRS for kind in ("spearman", "topk_iou"))
LOCALIZATION_COLUMNS = tuple(f"{metric}_{m}" for m in LOCALIZED for metric in ("energy_in_mask", "pointing_hit", "iou"))
LOC_DELTA_COLUMNS = tuple(f"loc_{m}" for m in LOCALIZED)
EVIDENCE_COLUMNS = (*OCCLUSION_COLUMNS, *FAITHFULNESS_COLUMNS)
KEY = ("image_id", "target_kind")

_FIXED: list[tuple[str, pa.DataType]] = [
    ("image_id", pa.string()),
    ("label", pa.int64()),
    ("label_name", pa.string()),
    ("target", pa.int64()),
    ("target_kind", pa.string()),
    ("pred", pa.int64()),
    ("prob", pa.float32()),
    ("target_prob", pa.float32()),
    ("correct", pa.bool_()),
    ("status", pa.string()),
    ("error_stage", pa.string()),
    ("error", pa.string()),
    ("map_h", pa.int32()),
    ("map_w", pa.int32()),
    *((name, pa.list_(pa.float16())) for name in MAP_COLUMNS),
    *((name, pa.float32()) for name in AGREEMENT_COLUMNS),
    *((name, pa.bool_() if name.startswith("pointing_hit") else pa.float32()) for name in LOCALIZATION_COLUMNS),
    ("mask_area", pa.float32()),
    *((name, pa.int64() if name.endswith("_pred") else pa.float32()) for name in OCCLUSION_COLUMNS),
    *((name, pa.bool_() if name.startswith("increase_") else pa.float32()) for name in FAITHFULNESS_COLUMNS),
    ("mask_source", pa.string()),
    ("notes", pa.string()),
]


def explanation_schema(manifest_schema: pa.Schema, with_boxes: bool) -> pa.Schema:
    """The output schema of a run: the fixed columns, Loc(delta) where boxes exist, then the
    manifest's own columns (those not already in the fixed part)."""
    fields = [pa.field(name, dtype) for name, dtype in _FIXED]
    if with_boxes:
        fields += [pa.field(name, pa.float32()) for name in LOC_DELTA_COLUMNS]
    taken = {f.name for f in fields} | {"kinds", "row_index"}
    fields += [f for f in manifest_schema if f.name not in taken]
    return pa.schema(fields)


def to_table(columns: dict[str, list], schema: pa.Schema) -> pa.Table:
    """A table in exactly ``schema``; missing columns are null."""
    n = len(next(iter(columns.values()))) if columns else 0
    arrays = [pa.array(columns.get(f.name, [None] * n), type=f.type, from_pandas=True) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)
