"""The dataset that the object-storage tests share: a small synthetic HAM10000-layout set on disk
(``local_copy``), the same files in an S3 bucket (``bucket_copy``, a manifest URI), and a random
checkpoint for its classes (``store_checkpoint``). Loaded by conftest.py as a pytest plugin."""

from __future__ import annotations

import pandas as pd
import pytest

from audit.data import load_dataset
from audit.data.ham10000 import CLASSES
from audit.data.synthetic import Shortcut, SyntheticSpec, generate
from audit.models.checkpoint import save_random_checkpoint

BUCKET = "audit-data"
IMAGES = 10


@pytest.fixture(scope="module")
def local_copy(tmp_path_factory):
    """The same dataset on disk: a manifest with relative paths next to its images and masks."""
    root = generate(
        tmp_path_factory.mktemp("local") / "syn",
        SyntheticSpec(images=IMAGES, height=48, width=64, shortcuts={"df": Shortcut("patch")}, seed=7),
        workers=1,
    )
    frame = load_dataset("synthetic", root).manifest
    rows = pd.DataFrame(
        {
            "image_id": frame["image_id"],
            "path": [p.split(f"{root}/", 1)[1] for p in frame["path"]],
            "mask_path": [p.split(f"{root}/", 1)[1] for p in frame["mask_path"]],
            "label_name": frame["label_name"],
        }
    )
    extra = pd.DataFrame(
        {
            "image_id": ["gone", "escape"],
            "path": ["HAM10000_images_part_1/gone.jpg", "../elsewhere/x.jpg"],
            "mask_path": [None, None],
            "label_name": ["nv", "nv"],
        }
    )
    pd.concat([rows, extra]).to_csv(root / "manifest.csv", index=False)
    return root


@pytest.fixture(scope="module")
def bucket_copy(s3, local_copy):
    """The dataset uploaded to s3://audit-data/ds/ as it lies on disk."""
    s3.create_dir(BUCKET)
    for path in local_copy.rglob("*"):
        if path.is_file():
            with s3.open_output_stream(f"{BUCKET}/ds/{path.relative_to(local_copy)}") as out:
                out.write(path.read_bytes())
    return f"s3://{BUCKET}/ds/manifest.csv"


@pytest.fixture(scope="module")
def store_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_random_checkpoint(path, "resnet18", CLASSES, (32, 32))
    return path
