"""Datasets -> the Manifest table: HAM10000, image folders, manifest files, synthetic lesions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from audit.data.fetch import default_data_dir
from audit.data.ham10000 import load_ham10000
from audit.data.imagefolder import load_imagefolder
from audit.data.manifest import Dataset, DatasetError
from audit.data.manifest_file import load_manifest_file
from audit.data.storage import is_uri
from audit.data.synthetic import DEFAULT_SPEC, SPEC_FILE, generate

DATASETS = ("ham10000", "imagefolder", "manifest", "synthetic")


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    classes: Sequence[str] | None = None,
    mask_dir: str | Path | None = None,
) -> Dataset:
    """Load dataset ``name`` from ``data_dir`` (a folder; the file itself for ``manifest``).

    ``ham10000`` and ``synthetic`` default to :func:`default_data_dir`; ``synthetic`` is
    generated there with the default spec when the folder holds no dataset yet.
    """
    # Absolute from here on: a loader joins its root with file names, and the rows' paths must
    # name the same files from any working directory (Ray workers have their own).
    if data_dir and is_uri(data_dir):
        return _load_from_store(name, str(data_dir), classes, mask_dir)
    data_dir = Path(data_dir).absolute() if data_dir else None
    mask_dir = Path(mask_dir).absolute() if mask_dir else None
    if name == "ham10000":
        return load_ham10000(Path(data_dir) if data_dir else default_data_dir("ham10000"))
    if name == "synthetic":
        root = Path(data_dir) if data_dir else default_data_dir("synthetic")
        if not (root / SPEC_FILE).is_file():
            generate(root, DEFAULT_SPEC)
        dataset = load_ham10000(root)
        dataset.name = "synthetic"
        return dataset
    if data_dir is None:
        raise DatasetError(f"--dataset {name} needs --data-dir")
    if name == "imagefolder":
        return load_imagefolder(Path(data_dir), Path(mask_dir) if mask_dir else None)
    if name == "manifest":
        return load_manifest_file(Path(data_dir), classes)
    raise DatasetError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")


def _load_from_store(name: str, location: str, classes: Sequence[str] | None, mask_dir) -> Dataset:
    """A dataset on object storage (a URI): the HAM10000, image-folder and manifest layouts."""
    if name == "ham10000":
        return load_ham10000(location)
    if name == "imagefolder":
        return load_imagefolder(location, str(mask_dir) if mask_dir else None)
    if name == "manifest":
        return load_manifest_file(location, classes)
    raise DatasetError(f"--dataset {name} is generated locally; upload it and read it as --dataset ham10000")


__all__ = ["DATASETS", "Dataset", "DatasetError", "default_data_dir", "load_dataset"]
