"""Datasets on object storage: a manifest in an S3 bucket (moto's server on 127.0.0.1) whose rows
name images and masks in the bucket, read through pyarrow's filesystems and audited by the job."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from audit.cli import main
from audit.config import RunConfig
from audit.data import DatasetError, load_dataset
from audit.data.storage import StorageError, read_bytes
from audit.pipeline.run import OUTPUT_DIR, Execution, run_audit

from .storage_fixtures import BUCKET, IMAGES


def test_a_manifest_in_a_bucket_names_objects_in_it(bucket_copy):
    dataset = load_dataset("manifest", bucket_copy)
    assert dataset.root == f"s3://{BUCKET}/ds"
    assert dataset.manifest["path"].str.startswith(f"s3://{BUCKET}/ds/HAM10000_images_part_1/").all()
    assert dataset.manifest["mask_path"].dropna().str.startswith(f"s3://{BUCKET}/ds/").all()
    (reason,) = dataset.rejected.loc[dataset.rejected["image_id"] == "escape", "reason"]
    assert "outside the dataset root" in reason  # `..` cannot leave the prefix


def test_missing_objects_and_buckets_are_one_line_errors(s3, bucket_copy):
    with pytest.raises(StorageError, match="file not found: s3://audit-data/ds/nothing.jpg"):
        read_bytes(f"s3://{BUCKET}/ds/nothing.jpg")
    with pytest.raises(DatasetError, match="manifest file not found: s3://no-such-bucket/manifest.csv"):
        load_dataset("manifest", "s3://no-such-bucket/manifest.csv")
    with pytest.raises(DatasetError, match="upload it and read it as --dataset ham10000"):
        load_dataset("synthetic", f"s3://{BUCKET}/ds")
    with pytest.raises(DatasetError, match="has no HAM10000_metadata.csv"):
        load_dataset("ham10000", "s3://no-such-bucket/ds")


def test_the_ham10000_layout_in_a_bucket_reads_as_on_disk(bucket_copy, local_copy):
    remote, local = load_dataset("ham10000", f"s3://{BUCKET}/ds"), load_dataset("ham10000", local_copy)
    assert remote.root == f"s3://{BUCKET}/ds" and len(remote.manifest) == len(local.manifest) == IMAGES
    columns = ["image_id", "label", "group"]
    assert remote.manifest[columns].equals(local.manifest[columns])
    prefix = f"s3://{BUCKET}/ds/"
    assert [p.removeprefix(prefix) for p in remote.manifest["path"]] == [
        p.removeprefix(f"{local_copy}/") for p in local.manifest["path"]
    ]
    assert remote.manifest["mask_path"].str.startswith(f"{prefix}HAM10000_segmentations_lesion_tschandl/").all()


def test_an_image_folder_in_a_bucket_with_its_masks(s3, bucket_copy, local_copy):
    images = sorted((local_copy / "HAM10000_images_part_1").glob("*.jpg"))[:4]
    masks = local_copy / "HAM10000_segmentations_lesion_tschandl"
    for i, image in enumerate(images):
        label = ("nv", "mel")[i % 2]
        with s3.open_output_stream(f"{BUCKET}/folders/{label}/{image.name}") as out:
            out.write(image.read_bytes())
        if i < 3:
            with s3.open_output_stream(f"{BUCKET}/masks/{label}/{image.stem}_segmentation.png") as out:
                out.write((masks / f"{image.stem}_segmentation.png").read_bytes())
    dataset = load_dataset("imagefolder", f"s3://{BUCKET}/folders", mask_dir=f"s3://{BUCKET}/masks")
    assert dataset.classes == ("mel", "nv") and len(dataset.manifest) == 4
    assert dataset.manifest["path"].str.startswith(f"s3://{BUCKET}/folders/").all()
    assert dataset.manifest["mask_path"].notna().sum() == 3


def test_the_command_line_takes_a_manifest_uri(bucket_copy):
    """`--data-dir s3://...` stays a URI (a path would fold its `//`); `audit data check` reads the bucket."""
    result = CliRunner().invoke(main, ["data", "check", "--dataset", "manifest", "--data-dir", bucket_copy, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["root"] == f"s3://{BUCKET}/ds" and report["rows"] == IMAGES + 1
    assert (report["readable"], report["missing"], report["masks_found"], report["rejected"]) == (IMAGES, 1, IMAGES, 1)


def test_configs_keep_uris_as_they_are(tmp_path):
    from audit.config import read_config_file

    uri = f"s3://{BUCKET}/ds/manifest.csv"
    config = RunConfig(dataset="manifest", data_dir=uri, model=str(tmp_path / "m.pt"))
    assert config.resolved().data_dir == uri and config.audit_name == "manifest"
    (tmp_path / "audit.toml").write_text(f'data_dir = "{uri}"\n')
    assert read_config_file(tmp_path / "audit.toml")["data_dir"] == uri  # not resolved against the file's folder


def _rows(run_dir) -> pd.DataFrame:
    files = sorted((run_dir / OUTPUT_DIR).glob("*.parquet"))
    return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True).sort_values("image_id")


def test_an_audit_of_the_bucket_equals_the_audit_of_the_same_files_on_disk(
    ray_session, bucket_copy, local_copy, store_checkpoint, tmp_path
):
    def audit(data_dir: str):
        config = RunConfig(
            dataset="manifest",
            data_dir=data_dir,
            model=str(store_checkpoint),
            out=str(tmp_path / "runs"),
            name="ds",
            batch_size=4,
            evidence="none",
            sanity_images=0,
        )
        return _rows(run_audit(config, Execution(progress=False)))

    remote, local = audit(bucket_copy), audit(str(local_copy / "manifest.csv"))
    assert len(remote) == len(local) == IMAGES + 2
    gone = remote[remote["image_id"] == "gone"].iloc[0]
    assert gone["error_stage"] == "decode" and gone["error"].startswith("file not found: s3://audit-data/ds/")
    ok = remote[remote["status"] == "ok"]
    assert len(ok) == IMAGES and (ok["mask_source"] == "provided").all()
    same = local[local["status"] == "ok"]
    assert ok["image_id"].tolist() == same["image_id"].tolist()
    assert ok["pred"].tolist() == same["pred"].tolist()
    assert ok["map_gradcam"].map(list).tolist() == same["map_gradcam"].map(list).tolist()
    assert ok["energy_in_mask_gradcam"].tolist() == same["energy_in_mask_gradcam"].tolist()
