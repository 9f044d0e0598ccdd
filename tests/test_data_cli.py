"""`audit data check`, `audit data synth` and `audit fetch ham10000` from the command line."""

from __future__ import annotations

import json

from click.testing import CliRunner
from PIL import Image

from audit.cli import main
from tests.test_data_fetch import server  # noqa: F401  (the local Dataverse fixture)


def _invoke(*args):
    return CliRunner().invoke(main, list(args))


def _synth(tmp_path, images=30):
    result = _invoke(
        "data", "synth", "--out", str(tmp_path / "syn"), "--images", str(images), "--shortcut", "df=patch:1:0:only"
    )
    assert result.exit_code == 0, result.output
    return tmp_path / "syn"


def test_synth_then_check_text_and_json(tmp_path):
    root = _synth(tmp_path)
    text = _invoke("data", "check", "--dataset", "synthetic", "--data-dir", str(root))
    assert text.exit_code == 0 and "verdict: usable" in text.output and "30 readable" in text.output
    report = json.loads(
        _invoke(
            "data", "check", "--dataset", "synthetic", "--data-dir", str(root), "--json", "--estimate-masks", "5"
        ).output
    )
    assert report["usable"] and report["rows"] == report["readable"] == report["masks_found"] == 30
    assert sum(c["images"] for c in report["classes"]) == 30
    assert report["mask_estimation"]["images"] == 5 and report["mask_estimation"]["mean_iou"] > 0.5


def test_check_counts_every_kind_of_bad_file(tmp_path):
    root = _synth(tmp_path, images=12)
    images = sorted((root / "HAM10000_images_part_1").glob("*.jpg"))
    images[0].write_bytes(b"")  # zero bytes
    images[1].write_text("not a jpeg")  # text named .jpg
    images[2].write_bytes(images[2].read_bytes()[:200])  # truncated
    images[3].unlink()  # missing
    Image.new("L", (99, 99)).save(
        root / "HAM10000_segmentations_lesion_tschandl" / f"{images[4].stem}_segmentation.png"
    )
    metadata = root / "HAM10000_metadata.csv"
    lines = metadata.read_text().splitlines()
    metadata.write_text(
        "\n".join([*lines, lines[1], lines[1].replace(",bcc,", ",xyz,").replace(",akiec,", ",xyz,")]) + "\n"
    )
    report = json.loads(
        _invoke("data", "check", "--dataset", "synthetic", "--data-dir", str(root), "--json", "--deep").output
    )
    assert report["rows"] == 12 and report["readable"] == 8
    assert report["missing"] == 1 and report["unreadable"] == 3
    assert report["masks_unreadable"] == 1
    assert report["rejected"] == 2 and set(report["rejected_reasons"]) >= {"duplicate image_id"}
    reasons = " ".join(p["reason"] for p in report["problems"])
    assert (
        "empty file" in reasons and "not an image" in reasons and "truncated" in reasons and "aspect ratio" in reasons
    )


def test_unusable_dataset_exits_2(tmp_path):
    root = _synth(tmp_path, images=3)
    for image in (root / "HAM10000_images_part_1").glob("*.jpg"):
        image.write_bytes(b"")
    result = _invoke("data", "check", "--dataset", "synthetic", "--data-dir", str(root))
    assert result.exit_code == 2 and "UNUSABLE" in result.output and "is unusable" in result.output


def test_missing_dataset_exits_2_with_a_hint(tmp_path):
    result = _invoke("data", "check", "--dataset", "ham10000", "--data-dir", str(tmp_path / "none"))
    assert result.exit_code == 2 and "audit fetch ham10000" in result.output


def test_bad_shortcut_exits_2():
    result = _invoke("data", "synth", "--out", "unused", "--shortcut", "df=confetti")
    assert result.exit_code == 2 and "unknown shortcut 'confetti'" in result.output


def test_fetch_command_prints_the_folder(tmp_path, server):  # noqa: F811
    result = _invoke("fetch", "ham10000", "--dest", str(tmp_path / "ham"), "--base-url", server)
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(tmp_path / "ham")
    assert (tmp_path / "ham" / "HAM10000_metadata.csv").is_file()


def test_fetch_command_failure_exits_2(tmp_path):
    result = _invoke("fetch", "ham10000", "--dest", str(tmp_path / "ham"), "--base-url", "http://127.0.0.1:9")
    assert result.exit_code == 2 and "cannot read the file list" in result.output


def test_data_help():
    assert _invoke("data", "check", "--help").exit_code == 0
    assert "Harvard Dataverse" in _invoke("fetch", "ham10000", "--help").output
