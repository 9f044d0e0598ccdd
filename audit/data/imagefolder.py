"""``imagefolder``: ``root/<class>/<image>`` as torchvision's ImageFolder, with optional masks.

Classes are the sub-folder names in sorted order. Masks, when ``mask_dir`` is given, sit in a
parallel tree ``mask_dir/<class>/<image stem>.png`` (or ``<stem>_mask.png``,
``<stem>_segmentation.png``); a missing mask leaves ``mask_path`` null for that image.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from audit.data.manifest import Dataset, DatasetError, ManifestBuilder, require_rows
from audit.data.storage import Listing, StorageError, is_uri

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_PATTERNS = ("{stem}.png", "{stem}_mask.png", "{stem}_segmentation.png")


def load_imagefolder(root: Path | str, mask_dir: Path | str | None = None) -> Dataset:
    """The manifest of ``root`` (a folder, or a URI on object storage with ``mask_dir`` on the same)."""
    if is_uri(root):
        return _load_from_store(str(root), str(mask_dir) if mask_dir else None)
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"{root} has no class sub-folders (expected root/<class>/<image>)")
    builder = ManifestBuilder(root, classes, mask_root=Path(mask_dir) if mask_dir else None)
    row = 0
    for label_name in classes:
        for path in sorted((root / label_name).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
                continue
            image_id = f"{label_name}/{path.stem}"
            builder.add(row, image_id, path, label_name, _mask_for(mask_dir, label_name, path.stem), None)
            row += 1
    manifest, rejected = builder.build()
    return require_rows(Dataset("imagefolder", root, tuple(classes), manifest, rejected))


def _load_from_store(root: str, mask_dir: str | None) -> Dataset:
    try:
        listing = Listing(root)
        masks = Listing(mask_dir) if mask_dir else None
    except StorageError as exc:
        raise DatasetError(str(exc)) from exc
    classes = [name for name in listing.folders() if not name.startswith(".")]
    if not classes:
        raise DatasetError(f"{root} has no class sub-folders (expected root/<class>/<image>)")
    builder = ManifestBuilder(root, classes, mask_root=mask_dir)
    row = 0
    for label_name in classes:
        for name in listing.files_in(label_name, IMAGE_SUFFIXES):
            stem = posixpath.splitext(posixpath.basename(name))[0]
            if stem.startswith("."):
                continue
            mask = next(
                (
                    f"{label_name}/{p.format(stem=stem)}"
                    for p in MASK_PATTERNS
                    if masks and masks.is_file(f"{label_name}/{p.format(stem=stem)}")
                ),
                None,
            )
            builder.add(
                row,
                f"{label_name}/{stem}",
                listing.location(name),
                label_name,
                masks.location(mask) if mask else None,
                None,
            )
            row += 1
    manifest, rejected = builder.build()
    return require_rows(Dataset("imagefolder", root, tuple(classes), manifest, rejected))


def _mask_for(mask_dir: Path | None, label_name: str, stem: str) -> Path | None:
    if mask_dir is None:
        return None
    for pattern in MASK_PATTERNS:
        candidate = Path(mask_dir) / label_name / pattern.format(stem=stem)
        if candidate.is_file():
            return candidate
    return None
