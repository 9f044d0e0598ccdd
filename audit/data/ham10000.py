"""HAM10000 (Tschandl et al., 2018): 10,015 dermatoscopic images of 7,470 lesions, 7 classes.

Reads ``HAM10000_metadata.csv`` (lesion_id, image_id, dx, dx_type, age, sex, localization)
and finds ``<image_id>.jpg`` in any of the public layouts:

* Kaggle: ``HAM10000_images_part_1/`` and ``HAM10000_images_part_2/``;
* the Harvard Dataverse release, ``HAM10000_images_part1.zip`` and ``..._part2.zip`` extracted
  into folders of those names (``audit fetch ham10000`` does this);
* a flat folder: the images next to the metadata, or in ``images/``.

Lesion masks (``HAM10000_segmentations_lesion_tschandl/<image_id>_segmentation.png``,
0 = skin, nonzero = lesion) are attached when present, at any depth of that folder.
``group`` is the lesion_id: a lesion has up to 6 images, and a split must keep them together.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

import pandas as pd

from audit.data.manifest import Dataset, DatasetError, ManifestBuilder, read_table, require_rows
from audit.data.storage import Listing, StorageError, is_uri

CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
CLASS_NAMES = {
    "akiec": "Actinic keratoses and intraepithelial carcinoma (Bowen's disease)",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis-like lesions",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevi",
    "vasc": "Vascular lesions",
}
MALIGNANT = frozenset({"akiec", "bcc", "mel"})  # malignant or pre-malignant
METADATA_FILE = "HAM10000_metadata.csv"
METADATA_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
IMAGE_FOLDERS = (
    "HAM10000_images_part_1",
    "HAM10000_images_part_2",
    "HAM10000_images_part1",
    "HAM10000_images_part2",
    "images",
    ".",
)
MASK_FOLDER = "HAM10000_segmentations_lesion_tschandl"
ARCHIVES = ("HAM10000_images_part1.zip", "HAM10000_images_part2.zip")


def is_malignant(label_name: str) -> bool:
    return label_name in MALIGNANT


def load_ham10000(root: Path | str) -> Dataset:
    """The HAM10000 manifest from ``root``, a folder or a URI on object storage; see the module
    docstring for the layouts."""
    root = str(root) if is_uri(root) else Path(root)
    metadata_path, images, masks = _locate_in_store(root) if isinstance(root, str) else _locate(root)
    frame, warnings = read_table(metadata_path)
    missing = [c for c in ("lesion_id", "image_id", "dx") if c not in frame.columns]
    if missing:
        raise DatasetError(
            f"{metadata_path}: missing columns {', '.join(missing)} (expected {', '.join(METADATA_COLUMNS)})"
        )
    if not images:
        unextracted = [name for name in ARCHIVES if isinstance(root, Path) and (root / name).is_file()]
        hint = f"; extract {' and '.join(unextracted)} first" if unextracted else ""
        warnings.append(f"no .jpg images found under {root}{hint}")
    extra_columns = [c for c in frame.columns if c not in ("image_id", "dx", "lesion_id")]
    builder = ManifestBuilder(root, CLASSES)
    for row, record in enumerate(frame.to_dict("records")):
        image_id = str(record["image_id"]).strip()
        path = images.get(image_id, f"{image_id}.jpg")  # relative to the root: a missing file fails at decode
        extra = {column: _typed(column, record[column]) for column in extra_columns}
        extra["malignant"] = is_malignant(str(record["dx"]).strip())
        builder.add(row, image_id, path, str(record["dx"]).strip(), masks.get(image_id), record["lesion_id"], extra)
    manifest, rejected = builder.build()
    dataset = Dataset("ham10000", root, CLASSES, manifest, rejected, dict(CLASS_NAMES), warnings)
    return require_rows(dataset)


def _locate(root: Path) -> tuple[Path, dict[str, Path], dict[str, Path]]:
    """The metadata file, images and masks (by image_id) of a local folder."""
    return _find_metadata(root), _index_files(root, IMAGE_FOLDERS, suffix=".jpg"), _index_masks(root / MASK_FOLDER)


def _locate_in_store(root: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """The same on object storage, from one listing of the root."""
    try:
        listing = Listing(root)
    except StorageError as exc:
        raise DatasetError(str(exc)) from exc
    names = [n for n in (METADATA_FILE, "HAM10000_metadata", "HAM10000_metadata.tab") if listing.is_file(n)]
    if not names:
        raise DatasetError(f"{root} has no {METADATA_FILE}")
    images: dict[str, str] = {}
    for folder in IMAGE_FOLDERS:
        for name in listing.files_in(folder, (".jpg",)):
            images.setdefault(posixpath.basename(name)[: -len(".jpg")], listing.location(name))
    suffix = "_segmentation.png"
    masks = {
        posixpath.basename(name)[: -len(suffix)]: listing.location(name)
        for name in listing.files_in(MASK_FOLDER, (suffix,), recursive=True)
    }
    return listing.location(names[0]), images, masks


def _find_metadata(root: Path) -> Path:
    if not root.is_dir():
        raise DatasetError(f"HAM10000 folder not found: {root} (run `audit fetch ham10000` to download it)")
    for name in (METADATA_FILE, "HAM10000_metadata", "HAM10000_metadata.tab"):
        if (root / name).is_file():
            return root / name
    raise DatasetError(f"{root} has no {METADATA_FILE} (run `audit fetch ham10000 --dest {root}` to download it)")


def _index_files(root: Path, folders: tuple[str, ...], suffix: str) -> dict[str, Path]:
    """image_id -> path for every ``*suffix`` file directly inside the given folders."""
    found: dict[str, Path] = {}
    for folder in folders:
        directory = root / folder
        if not directory.is_dir():
            continue
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.lower().endswith(suffix) and entry.is_file():
                    found.setdefault(entry.name[: -len(suffix)], Path(entry.path))
    return found


def _index_masks(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    suffix = "_segmentation.png"
    return {path.name[: -len(suffix)]: path for path in folder.rglob(f"*{suffix}")}


def _typed(column: str, value: object) -> object:
    if column == "age":
        number = pd.to_numeric(value, errors="coerce")
        return None if pd.isna(number) else float(number)
    return None if value in ("", None) else str(value)
