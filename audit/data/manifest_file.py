"""``manifest``: a CSV or Parquet file listing the images.

Required: ``path`` and ``label`` (class index) or ``label_name``. Optional: ``image_id``
(default: the path), ``mask_path``, ``group``, a box as ``box_x0 box_y0 box_x1 box_y1``
(fractions of the image), and any other column, passed through as metadata. Relative
paths resolve against the file's folder, which is the dataset root: paths outside it are
rejected. The file may be on object storage (an ``s3://``, ``gs://``... URI): its paths are then
URIs under its folder, or relative to it. Classes: the given ``classes`` (a checkpoint's), else
the sorted ``label_name`` values, else ``0 .. max(label)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from audit.data.manifest import BOX_COLUMNS, Dataset, DatasetError, ManifestBuilder, read_table, require_rows
from audit.data.storage import StorageError, is_uri, stamp, uri_parent

KNOWN = ("image_id", "path", "label", "label_name", "mask_path", "group")


def load_manifest_file(file: Path | str, classes: Sequence[str] | None = None) -> Dataset:
    """The manifest in ``file``, a local path or a URI (``s3://bucket/ds/manifest.csv``: its rows'
    paths are then URIs under ``s3://bucket/ds``, or paths relative to it)."""
    file = str(file) if is_uri(file) else Path(file)
    if not _is_file(file):
        raise DatasetError(f"manifest file not found: {file} (--data-dir names the CSV or Parquet file itself)")
    frame, warnings = read_table(file)
    if "path" not in frame.columns or not ({"label", "label_name"} & set(frame.columns)):
        raise DatasetError(
            f"{file}: needs a 'path' column and a 'label' or 'label_name' column; "
            f"has {', '.join(map(str, frame.columns))}"
        )
    frame = frame.astype(object).where(frame.notna(), None)
    names = _label_names(frame, classes, file)
    class_list = tuple(classes) if classes else _classes(frame, names)
    root = uri_parent(file) if isinstance(file, str) else file.parent
    extra_columns = [c for c in frame.columns if c not in KNOWN]
    builder = ManifestBuilder(root, class_list)
    for row, (record, label_name) in enumerate(zip(frame.to_dict("records"), names)):
        path = "" if record["path"] is None else str(record["path"])
        image_id = record.get("image_id") or path
        extra = {c: _box(record[c]) if c in BOX_COLUMNS else record[c] for c in extra_columns}
        builder.add(row, image_id, path, label_name, record.get("mask_path") or None, record.get("group"), extra)
    manifest, rejected = builder.build()
    return require_rows(Dataset("manifest", root, class_list, manifest, rejected, warnings=warnings))


def _is_file(file: Path | str) -> bool:
    if isinstance(file, Path):
        return file.is_file()
    try:
        stamp(file)
    except StorageError:
        return False
    return True


def _label_names(frame: pd.DataFrame, classes: Sequence[str] | None, file: Path) -> list[str]:
    if "label_name" in frame.columns:
        return ["" if v is None else str(v).strip() for v in frame["label_name"]]
    labels = pd.to_numeric(frame["label"], errors="coerce")
    if classes:
        return [
            classes[int(v)] if pd.notna(v) and 0 <= v < len(classes) and v == int(v) else f"<label {v}>" for v in labels
        ]
    if labels.isna().any() or (labels < 0).any() or (labels != labels.round()).any():
        raise DatasetError(f"{file}: 'label' must hold class indices 0, 1, ... (or give 'label_name')")
    return [str(int(v)) for v in labels]


def _classes(frame: pd.DataFrame, names: list[str]) -> tuple[str, ...]:
    if "label_name" in frame.columns:
        return tuple(sorted({n for n in names if n}))
    return tuple(str(i) for i in range(max((int(n) for n in names), default=-1) + 1))


def _box(value: object) -> float | None:
    number = pd.to_numeric(value, errors="coerce")
    return None if pd.isna(number) else float(number)
