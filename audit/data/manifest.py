"""The Manifest: one row per image, the table every dataset loader returns.

Columns: ``image_id`` (str, unique), ``path`` (str, absolute, inside the dataset root),
``label`` (int), ``label_name`` (str), ``mask_path`` (str, or None where the image has no mask:
never NaN or a blank, whatever the source held), ``group`` (str; the
lesion for HAM10000, used for leakage-free splits), ``source_row`` (the row's position in the
dataset's own listing, which rejected rows share), optionally ``box_x0 box_y0 box_x1 box_y1``
(fractions of the image), then pass-through metadata columns.

Rows that cannot be used (an unknown label, a duplicate id, a path outside the root) are not
dropped silently: they go to :attr:`Dataset.rejected` with the reason, so a job can report
them as error rows and ``audit data check`` can list them.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pandas as pd

from audit.data.storage import StorageError, is_uri, read_bytes, uri_inside
from audit.errors import AuditError, first_line

CORE_COLUMNS = ("image_id", "path", "label", "label_name", "mask_path", "group")
BOX_COLUMNS = ("box_x0", "box_y0", "box_x1", "box_y1")
REJECTED_COLUMNS = ("row", "image_id", "path", "label_name", "reason")


class DatasetError(AuditError):
    """A dataset that cannot be used at all: missing folder or metadata, no usable rows."""


@dataclass
class Dataset:
    """A loaded dataset: the manifest of usable rows, the rejected rows, and what it is."""

    name: str
    root: Path | str  # a folder, or a URI on object storage
    classes: tuple[str, ...]
    manifest: pd.DataFrame
    rejected: pd.DataFrame
    class_names: dict[str, str] = field(default_factory=dict)  # short -> full name
    warnings: list[str] = field(default_factory=list)


def resolve_inside(root: Path | str, candidate: str | os.PathLike) -> Path | str | None:
    """``candidate`` (relative to ``root``, or absolute) resolved, or None when it escapes ``root``.

    Symbolic links are followed before the check, so a link that points out of the root is
    refused like ``../``. A root on object storage (a URI) holds URIs under its prefix
    (:func:`audit.data.storage.uri_inside`); a local root holds no URI.
    """
    if is_uri(root):
        return uri_inside(str(root), str(candidate))
    if is_uri(candidate):
        return None
    root = Path(root).resolve()
    path = Path(candidate)
    resolved = (path if path.is_absolute() else root / path).resolve()
    if resolved != root and root not in resolved.parents:
        return None
    return resolved


def read_table(path: Path | str) -> tuple[pd.DataFrame, list[str]]:
    """A CSV (UTF-8 with or without BOM; Latin-1 as a fallback, with a warning) or Parquet file,
    local or on object storage."""
    warnings: list[str] = []
    name = PurePosixPath(urlsplit(str(path)).path).name if is_uri(path) else Path(path).name
    source = path
    if is_uri(path):
        try:
            source = io.BytesIO(read_bytes(path))
        except StorageError as exc:
            raise DatasetError(str(exc)) from exc
    if PurePosixPath(name).suffix.lower() in (".parquet", ".pq"):
        try:
            return pd.read_parquet(source), warnings
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise DatasetError(f"{path}: not a readable Parquet file ({first_line(exc)})") from exc
    try:
        try:
            frame = pd.read_csv(source, encoding="utf-8-sig", dtype=str, keep_default_na=False)
        except UnicodeDecodeError:
            if isinstance(source, io.BytesIO):
                source.seek(0)
            frame = pd.read_csv(source, encoding="latin-1", dtype=str, keep_default_na=False)
            warnings.append(f"{name} is not UTF-8; read as Latin-1")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError) as exc:
        raise DatasetError(f"{path}: not a readable CSV file ({first_line(exc)})") from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame, warnings


class ManifestBuilder:
    """Collects rows, rejecting the unusable ones with a reason; builds the two tables."""

    def __init__(self, root: Path | str, classes: Sequence[str], mask_root: Path | None = None) -> None:
        self.root = root if is_uri(root) else Path(root).resolve()
        mask_root = mask_root or root
        self.mask_root = mask_root if is_uri(mask_root) else Path(mask_root).resolve()
        self.classes = tuple(classes)
        self._index = {name: i for i, name in enumerate(self.classes)}
        self._rows: list[dict] = []
        self._rejected: list[dict] = []
        self._seen: dict[str, int] = {}

    def add(
        self,
        row: int,
        image_id: str,
        path: str | os.PathLike,
        label_name: str,
        mask_path: str | os.PathLike | None = None,
        group: str | None = None,
        extra: dict | None = None,
    ) -> None:
        image_id = "" if missing(image_id) else str(image_id).strip()
        path = "" if missing(path) else str(path)
        mask_path = None if missing(mask_path) else str(mask_path)
        group = None if missing(group) else group
        reason = "empty path" if not path.strip() else self._problem(image_id, label_name)
        resolved = mask = None
        if reason is None:
            resolved, reason = _inside(self.root, path, "path", "the dataset root")
        if reason is None and mask_path:
            mask, reason = _inside(self.mask_root, mask_path, "mask path", "the mask folder")
        if reason is not None:
            self._rejected.append(
                {"row": row, "image_id": image_id, "path": str(path), "label_name": str(label_name), "reason": reason}
            )
            return
        self._seen[image_id] = row
        self._rows.append(
            {
                "image_id": image_id,
                "path": str(resolved),
                "label": self._index[label_name],
                "label_name": label_name,
                "mask_path": str(mask) if mask is not None else None,
                "group": str(group) if group not in (None, "") else image_id,
                "source_row": row,
                **(extra or {}),
            }
        )

    def _problem(self, image_id: str, label_name: str) -> str | None:
        if not image_id:
            return "empty image_id"
        if image_id in self._seen:
            return f"duplicate image_id (first seen at row {self._seen[image_id]})"
        if label_name not in self._index:
            return f"label {label_name!r} is not one of the classes ({', '.join(self.classes)})"
        return None

    def build(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        manifest = pd.DataFrame(self._rows, columns=_columns(self._rows))
        manifest = manifest.astype(
            {"image_id": str, "path": str, "label": "int64", "label_name": str, "group": str, "source_row": "int64"}
        )
        manifest = with_missing_masks_as_none(manifest)
        rejected = pd.DataFrame(self._rejected, columns=list(REJECTED_COLUMNS))
        return manifest, rejected


def _inside(root: Path | str, candidate: str, what: str, where: str) -> tuple[Path | str | None, str | None]:
    """``(resolved path, None)``, or ``(None, reason)`` for a path outside ``root`` or no path at all."""
    try:
        resolved = resolve_inside(root, candidate)
    except (ValueError, OSError) as exc:  # a NUL byte, a name too long for the filesystem
        return None, f"{what} {candidate[:80]!r} is not a usable file name ({first_line(exc)})"
    if resolved is None:
        return None, f"{what} {candidate!r} is outside {where} {root}"
    return resolved, None


def with_missing_masks_as_none(manifest: pd.DataFrame) -> pd.DataFrame:
    """``mask_path`` as an object column holding a str or None: pandas reads a missing string as NaN
    (and a string column of pandas 3 cannot hold None), which is truthy and not a path. Applied where
    a manifest is made and where one is read back from Parquet."""
    values = [None if missing(v) else str(v) for v in manifest["mask_path"]]
    return manifest.assign(mask_path=pd.Series(values, index=manifest.index, dtype=object))


def missing(value: object) -> bool:
    """None, NaN (what pandas reads for an empty cell) or a blank string."""
    if value is None:
        return True
    if isinstance(value, float):
        return value != value
    return isinstance(value, str) and not value.strip()


def _columns(rows: Iterable[dict]) -> list[str]:
    columns = [*CORE_COLUMNS, "source_row"]
    for row in rows:
        columns += [key for key in row if key not in columns]
    return columns


def require_rows(dataset: Dataset) -> Dataset:
    """Fail clearly when nothing usable is left."""
    if dataset.manifest.empty:
        detail = ""
        if not dataset.rejected.empty:
            reasons = dataset.rejected["reason"].value_counts().head(3)
            detail = "; rejected: " + "; ".join(f"{n} x {reason}" for reason, n in reasons.items())
        raise DatasetError(f"dataset {dataset.name!r} at {dataset.root} has no usable images{detail}")
    return dataset
