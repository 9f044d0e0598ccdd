"""Dataset loaders -> the Manifest table, and the rows they must reject with a reason."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from audit.data import DatasetError, load_dataset
from audit.data.ham10000 import CLASSES, MALIGNANT
from audit.data.manifest import CORE_COLUMNS

HEADER = "lesion_id,image_id,dx,dx_type,age,sex,localization"


def _jpeg(path, colour=(120, 80, 60), size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color=colour).save(path, quality=90)
    return path


def _mask(path, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.zeros((size[1], size[0]), dtype=np.uint8)
    values[10:20, 10:30] = 255
    Image.fromarray(values).save(path)


def _ham(root, rows, folders=("HAM10000_images_part_1", "HAM10000_images_part_2"), encoding="utf-8", masks=True):
    """Metadata with `rows` (lesion, image, dx); images spread over `folders`; masks for all."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [HEADER] + [f"{lesion},{image},{dx},histo,45.0,female,back" for lesion, image, dx in rows]
    (root / "HAM10000_metadata.csv").write_bytes("\n".join(lines).encode(encoding))
    for i, (_, image, _) in enumerate(rows):
        _jpeg(root / folders[i % len(folders)] / f"{image}.jpg")
        if masks:
            _mask(root / "HAM10000_segmentations_lesion_tschandl" / f"{image}_segmentation.png")
    return root


ROWS = [("HAM_1", "ISIC_1", "mel"), ("HAM_1", "ISIC_2", "mel"), ("HAM_2", "ISIC_3", "nv"), ("HAM_3", "ISIC_4", "akiec")]


def test_ham10000_kaggle_layout(tmp_path):
    dataset = load_dataset("ham10000", _ham(tmp_path / "ham", ROWS))
    manifest = dataset.manifest
    assert list(manifest.columns[:6]) == list(CORE_COLUMNS)
    assert dataset.classes == CLASSES == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    assert manifest["label"].tolist() == [4, 4, 5, 0]
    assert manifest["group"].tolist() == ["HAM_1", "HAM_1", "HAM_2", "HAM_3"]
    assert manifest["malignant"].tolist() == [True, True, False, True]
    assert manifest["mask_path"].notna().all()
    assert manifest[["dx_type", "age", "sex", "localization"]].iloc[0].tolist() == ["histo", 45.0, "female", "back"]
    assert all(os.path.isfile(p) for p in manifest["path"])
    assert dataset.rejected.empty and MALIGNANT == {"mel", "bcc", "akiec"}
    assert dataset.class_names["df"] == "Dermatofibroma"


@pytest.mark.parametrize("kind", ["ham10000", "imagefolder"])
def test_a_relative_data_dir_gives_paths_to_the_files(tmp_path, monkeypatch, kind):
    """The rows name the files from any working directory (Ray workers have their own)."""
    if kind == "ham10000":
        _ham(tmp_path / "data" / "ham", ROWS)
    else:
        for name in ("a", "b"):
            _jpeg(tmp_path / "data" / "ham" / name / "x.jpg")
    monkeypatch.chdir(tmp_path / "data")
    manifest = load_dataset(kind, "ham").manifest
    assert manifest["path"].map(os.path.isabs).all() and manifest["path"].map(os.path.isfile).all()


@pytest.mark.parametrize("folders", [("HAM10000_images_part1", "HAM10000_images_part2"), (".",), ("images",)])
def test_ham10000_dataverse_and_flat_layouts(tmp_path, folders):
    dataset = load_dataset("ham10000", _ham(tmp_path / "ham", ROWS, folders=folders))
    assert all(os.path.isfile(p) for p in dataset.manifest["path"])


def test_ham10000_masks_in_a_nested_folder_and_missing_masks(tmp_path):
    root = _ham(tmp_path / "ham", ROWS, masks=False)
    _mask(root / "HAM10000_segmentations_lesion_tschandl" / "nested" / "ISIC_1_segmentation.png")
    manifest = load_dataset("ham10000", root).manifest
    assert manifest["mask_path"].notna().tolist() == [True, False, False, False]


def test_unknown_labels_and_duplicate_ids_are_rejected_with_reasons(tmp_path):
    rows = ROWS + [("HAM_9", "ISIC_9", "psoriasis"), ("HAM_1", "ISIC_1", "mel")]
    dataset = load_dataset("ham10000", _ham(tmp_path / "ham", rows))
    assert len(dataset.manifest) == 4 and len(dataset.rejected) == 2
    reasons = dataset.rejected.set_index("row")["reason"]
    assert "'psoriasis' is not one of the classes" in reasons[4]
    assert reasons[5] == "duplicate image_id (first seen at row 0)"


def test_missing_images_stay_in_the_manifest(tmp_path):
    root = _ham(tmp_path / "ham", ROWS)
    (root / "HAM10000_images_part_1" / "ISIC_1.jpg").unlink()
    manifest = load_dataset("ham10000", root).manifest
    assert len(manifest) == 4 and not os.path.exists(manifest["path"][0])  # decode reports it, nothing is lost


def test_csv_with_bom_and_non_utf8_bytes(tmp_path):
    bom = _ham(tmp_path / "bom", ROWS, encoding="utf-8-sig")
    assert len(load_dataset("ham10000", bom).manifest) == 4
    latin = tmp_path / "latin"
    _ham(latin, ROWS)
    text = (latin / "HAM10000_metadata.csv").read_text().replace("back", "épaule")
    (latin / "HAM10000_metadata.csv").write_bytes(text.encode("latin-1"))
    dataset = load_dataset("ham10000", latin)
    assert dataset.manifest["localization"][0] == "épaule"
    assert any("not UTF-8" in w for w in dataset.warnings)


def test_missing_folder_metadata_and_columns(tmp_path):
    with pytest.raises(DatasetError, match="audit fetch ham10000"):
        load_dataset("ham10000", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="has no HAM10000_metadata.csv"):
        load_dataset("ham10000", tmp_path / "empty")
    (tmp_path / "empty" / "HAM10000_metadata.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DatasetError, match="missing columns lesion_id, image_id, dx"):
        load_dataset("ham10000", tmp_path / "empty")


def test_empty_dataset(tmp_path):
    root = tmp_path / "ham"
    root.mkdir()
    (root / "HAM10000_metadata.csv").write_text(HEADER + "\n")
    with pytest.raises(DatasetError, match="no usable images"):
        load_dataset("ham10000", root)


def test_all_rows_rejected_names_the_reason(tmp_path):
    with pytest.raises(DatasetError, match="is not one of the classes"):
        load_dataset("ham10000", _ham(tmp_path / "ham", [("HAM_1", "ISIC_1", "wart")]))


def test_imagefolder_with_parallel_masks(tmp_path):
    for cls, names in {"benign": ["a", "b"], "malignant": ["c"]}.items():
        for name in names:
            _jpeg(tmp_path / "images" / cls / f"{name}.jpg")
    _mask(tmp_path / "masks" / "benign" / "a.png")
    (tmp_path / "images" / "benign" / "notes.txt").write_text("not an image")
    dataset = load_dataset("imagefolder", tmp_path / "images", mask_dir=tmp_path / "masks")
    assert dataset.classes == ("benign", "malignant")
    assert dataset.manifest["image_id"].tolist() == ["benign/a", "benign/b", "malignant/c"]
    assert dataset.manifest["label"].tolist() == [0, 0, 1]
    assert dataset.manifest["mask_path"].notna().tolist() == [True, False, False]


def test_imagefolder_without_classes(tmp_path):
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_dataset("imagefolder", tmp_path)


def _manifest_root(tmp_path):
    root = tmp_path / "data"
    for name in ("a", "b", "c"):
        _jpeg(root / "img" / f"{name}.jpg")
    return root


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_manifest_file_with_names_masks_boxes_and_metadata(tmp_path, fmt):
    root = _manifest_root(tmp_path)
    _mask(root / "img" / "a_mask.png")
    frame = pd.DataFrame(
        {
            "path": ["img/a.jpg", "img/b.jpg", str(root / "img" / "c.jpg")],
            "label_name": ["mel", "nv", "mel"],
            "mask_path": ["img/a_mask.png", None, None],
            "group": ["p1", "p1", "p2"],
            "box_x0": [0.1, None, 0.2],
            "box_y0": [0.1, None, 0.2],
            "box_x1": [0.5, None, 0.9],
            "box_y1": [0.6, None, 0.9],
            "site": ["back", "arm", "leg"],
        }
    )
    file = root / f"list.{fmt}"
    frame.to_csv(file, index=False) if fmt == "csv" else frame.to_parquet(file)
    dataset = load_dataset("manifest", file)
    manifest = dataset.manifest
    assert dataset.classes == ("mel", "nv") and manifest["label"].tolist() == [0, 1, 0]
    assert manifest["image_id"].tolist() == ["img/a.jpg", "img/b.jpg", str(root / "img" / "c.jpg")]
    assert manifest["group"].tolist() == ["p1", "p1", "p2"]
    assert manifest["mask_path"].notna().tolist() == [True, False, False]
    assert manifest["box_x1"][0] == 0.5 and pd.isna(manifest["box_x1"][1])
    assert manifest["site"].tolist() == ["back", "arm", "leg"]


def test_manifest_paths_that_escape_the_root_are_rejected(tmp_path):
    root = _manifest_root(tmp_path)
    outside = _jpeg(tmp_path / "secret.jpg")
    (root / "img" / "link.jpg").symlink_to(outside)
    rows = ["img/a.jpg", "../secret.jpg", str(outside), "img/link.jpg", "img/../img/b.jpg", ""]
    pd.DataFrame({"path": rows, "label": [0, 1, 0, 1, 0, 1]}).to_csv(root / "list.csv", index=False)
    dataset = load_dataset("manifest", root / "list.csv")
    assert dataset.manifest["image_id"].tolist() == ["img/a.jpg", "img/../img/b.jpg"]
    assert dataset.rejected["row"].tolist() == [1, 2, 3, 5]
    assert dataset.rejected["reason"].str.contains("outside the dataset root").tolist() == [True, True, True, False]
    assert dataset.rejected["reason"].tolist()[-1] == "empty path"
    assert dataset.classes == ("0", "1")


def test_manifest_with_checkpoint_classes_and_bad_labels(tmp_path):
    root = _manifest_root(tmp_path)
    pd.DataFrame({"path": ["img/a.jpg", "img/b.jpg"], "label": [1, 7]}).to_csv(root / "list.csv", index=False)
    dataset = load_dataset("manifest", root / "list.csv", classes=["benign", "malignant"])
    assert dataset.manifest["label_name"].tolist() == ["malignant"] and len(dataset.rejected) == 1


def test_manifest_needs_path_and_label(tmp_path):
    (tmp_path / "list.csv").write_text("file,class\na.jpg,1\n")
    with pytest.raises(DatasetError, match="needs a 'path' column"):
        load_dataset("manifest", tmp_path / "list.csv")
    with pytest.raises(DatasetError, match="names the CSV or Parquet file itself"):
        load_dataset("manifest", tmp_path / "none.csv")
    with pytest.raises(DatasetError, match="needs --data-dir"):
        load_dataset("imagefolder")
