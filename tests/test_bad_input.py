"""The bad-input sweep: every command, the bad input a user can give it, one test per case.

Each case must end with exit 2 and one line on stderr that starts with ``error:`` (no traceback),
and must leave nothing half-written where the command would have written."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from audit.cli import main
from audit.data.ham10000 import CLASSES
from audit.data.synthetic import SyntheticSpec, generate
from audit.models.checkpoint import save_random_checkpoint
from tests.report_runs import class_rows, write_run


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A valid checkpoint, dataset, manifest and run, and the bad files made from them."""
    root = tmp_path_factory.mktemp("bad-input")
    checkpoint = root / "model.pt"
    save_random_checkpoint(checkpoint, "resnet18", CLASSES, (32, 32))
    data = generate(root / "ham", SyntheticSpec(images=14, height=32, width=32, seed=3), workers=1)
    images = sorted((data / "HAM10000_images_part_1").glob("*.jpg"))
    run = write_run(root / "runs" / "20261201-100000-aaaaaaaa", class_rows(0, 12, list(CLASSES)), list(CLASSES))
    made = {"root": root, "checkpoint": checkpoint, "data": data, "images": images, "run": run}
    made["text"] = _write(root / "notes.txt", b"not a checkpoint\n")
    made["empty"] = _write(root / "empty.pt", b"")
    made["truncated"] = _write(root / "truncated.pt", checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    other_format = root / "state_dict.pt"
    torch.save({"weight": torch.zeros(2)}, other_format)
    made["other_format"] = other_format
    lying = torch.load(checkpoint, weights_only=True)
    lying["arch"] = "resnet34"  # the state dict is a resnet18's
    torch.save(lying, root / "lying.pt")
    made["lying"] = root / "lying.pt"
    made["folder"] = root / "a-folder"
    made["folder"].mkdir()
    return made


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _manifest(files, name: str, frame: pd.DataFrame | None = None, text: bytes | None = None) -> Path:
    path = files["root"] / name
    if text is not None:
        path.write_bytes(text)
    elif path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return path


def assert_bad_input(result, message: str) -> None:
    output = result.output
    assert result.exit_code == 2, f"exit {result.exit_code}: {output}\n{result.exception!r}"
    assert result.stderr.startswith("error: "), output
    assert len(result.stderr.strip().splitlines()) == 1, output
    assert "Traceback" not in output
    assert message in result.stderr, output


def invoke(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="audit")


# --- audit run -----------------------------------------------------------------------------------

RUN_CHECKPOINTS = [
    ("missing", lambda f: f["root"] / "nope.pt", "checkpoint not found"),
    ("folder", lambda f: f["folder"], "checkpoint not found"),
    ("empty", lambda f: f["empty"], "not a readable torch checkpoint"),
    ("text", lambda f: f["text"], "not a readable torch checkpoint"),
    ("truncated", lambda f: f["truncated"], "not a readable torch checkpoint"),
    ("another format", lambda f: f["other_format"], "missing keys format, arch"),
    (
        "another architecture than it says",
        lambda f: f["lying"],
        "do not fit resnet34 with 7 classes: 96 missing (e.g. layer1.2.",
    ),
]


@pytest.mark.parametrize(("case", "make", "message"), RUN_CHECKPOINTS, ids=[c[0] for c in RUN_CHECKPOINTS])
def test_run_with_a_bad_checkpoint(files, tmp_path, case, make, message):
    result = invoke(
        "run", "--dataset", "synthetic", "--data-dir", files["data"], "--checkpoint", make(files), "--out", tmp_path
    )
    assert_bad_input(result, message)
    assert not any(tmp_path.iterdir())  # nothing half-way


def test_run_with_a_missing_data_folder(files, tmp_path):
    result = invoke(
        "run", "--dataset", "ham10000", "--data-dir", tmp_path / "nope", "--checkpoint", files["checkpoint"]
    )
    assert_bad_input(result, "HAM10000 folder not found")


def test_run_with_a_file_where_the_data_folder_should_be(files, tmp_path):
    result = invoke(
        "run",
        "--dataset",
        "ham10000",
        "--data-dir",
        files["text"],
        "--checkpoint",
        files["checkpoint"],
        "--out",
        tmp_path,
    )
    assert_bad_input(result, "HAM10000 folder not found")
    assert not any(tmp_path.iterdir())


def test_run_with_a_folder_where_the_manifest_file_should_be(files, tmp_path):
    result = invoke(
        "run",
        "--dataset",
        "manifest",
        "--data-dir",
        files["folder"],
        "--checkpoint",
        files["checkpoint"],
        "--out",
        tmp_path,
    )
    assert_bad_input(result, "manifest file not found")


CONFIGS = [
    ("missing", None, "config file not found"),
    ("not TOML", b"batch_size = = 3\n", "is not valid TOML"),
    ("wrong type", b'batch_size = "32"\n', "batch_size"),
    ("unknown key", b"batchsize = 32\n", "unknown option 'batchsize'"),
    ("not UTF-8", b"name = '\xff\xfe'\n", "cannot read config file"),
    ("bad threshold", b"[thresholds]\noff_object_fail = 'high'\n", "off_object_fail"),
]


@pytest.mark.parametrize(("case", "content", "message"), CONFIGS, ids=[c[0] for c in CONFIGS])
def test_run_with_a_bad_config_file(files, tmp_path, case, content, message):
    config = tmp_path / "job.toml"
    if content is not None:
        config.write_bytes(content)
    result = invoke("run", "--config", config, "--dataset", "synthetic", "--checkpoint", files["checkpoint"])
    assert_bad_input(result, message)


def test_run_with_a_folder_as_config(files):
    result = invoke("run", "--config", files["folder"], "--dataset", "synthetic", "--checkpoint", files["checkpoint"])
    assert_bad_input(result, "is a directory. (see audit run --help)")


RESUMES = [
    ("no run.json", None, "is not a run directory"),
    ("run.json cut short", b'{"run_id": "x", "sta', "is not a cam-audit run file"),
    ("run.json of another tool", b'{"name": "something else"}', "is not a cam-audit run file"),
    ("run.json not an object", b"[1, 2]", "is not a cam-audit run file"),
    (
        "run.json with a bad config",
        b'{"run_id": "x", "status": "interrupted", "config": {"dataset": 3}, "model": {"classes": []}}',
        "is not a cam-audit run file: missing option: model",
    ),
]


@pytest.mark.parametrize(("case", "content", "message"), RESUMES, ids=[c[0] for c in RESUMES])
def test_resume_of_a_folder_that_is_not_a_run(tmp_path, case, content, message):
    folder = tmp_path / "20261201-100000-bbbbbbbb"
    folder.mkdir()
    if content is not None:
        (folder / "run.json").write_bytes(content)
    assert_bad_input(invoke("run", "--resume", folder), message)


# --- manifests: what a user's own listing can get wrong --------------------------------------------


def _manifest_cases(files) -> dict[str, tuple[Path, str]]:
    image = str(files["images"][0])
    return {
        "empty file": (_manifest(files, "empty.csv", text=b""), "not a readable CSV file"),
        "header only": (_manifest(files, "header.csv", text=b"path,label_name\n"), "has no usable images"),
        "missing columns": (_manifest(files, "cols.csv", pd.DataFrame({"file": [image]})), "needs a 'path' column"),
        "NaN labels": (
            _manifest(files, "nan.csv", pd.DataFrame({"path": [image], "label": [float("nan")]})),
            "'label' must hold class indices",
        ),
        "empty labels": (
            _manifest(files, "blank.csv", pd.DataFrame({"path": [image], "label_name": [""]})),
            "has no usable images",
        ),
        "non-UTF-8 and very long paths": (
            _manifest(files, "long.csv", text=b"path,label_name\n" + b"\xe9" * 5000 + b".jpg,df\n"),
            "has no usable images",
        ),
        "a folder as a path": (
            _manifest(files, "folder.csv", pd.DataFrame({"path": [str(files["folder"])], "label_name": ["df"]})),
            "has no usable images",
        ),
        "damaged parquet": (_manifest(files, "bad.parquet", text=b"PAR1garbage"), "not a readable Parquet file"),
    }


MANIFEST_CASES = [
    "empty file",
    "header only",
    "missing columns",
    "NaN labels",
    "empty labels",
    "non-UTF-8 and very long paths",
    "a folder as a path",
    "damaged parquet",
]


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_data_check_of_a_bad_manifest(files, case):
    path, message = _manifest_cases(files)[case]
    result = invoke("data", "check", "--dataset", "manifest", "--data-dir", path)
    if case in ("non-UTF-8 and very long paths", "a folder as a path"):
        message = "is unusable: none of its 1 images can be read"  # listed, counted, and unusable
    assert_bad_input(result, message)


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_train_on_a_bad_manifest(files, tmp_path, case):
    path, _ = _manifest_cases(files)[case]
    out = tmp_path / "model.pt"
    result = invoke(
        "train", "--dataset", "manifest", "--data-dir", path, "--arch", "resnet18", "--weights", "none",
        "--image-size", "32", "--epochs", "1", "--out", out,
    )  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert result.stderr.strip().splitlines()[-1] == errors[0]  # progress lines may come before it
    assert not out.exists()


def test_duplicate_ids_are_rejected_rows_with_their_reason(files):
    image = str(files["images"][0])
    frame = pd.DataFrame({"image_id": ["a", "a"], "path": [image, image], "label_name": ["df", "df"]})
    result = invoke("data", "check", "--dataset", "manifest", "--data-dir", _manifest(files, "dup.csv", frame))
    assert result.exit_code == 0, result.output
    assert "1 x duplicate image_id" in result.stdout


def test_manifest_ids_that_are_not_strings_are_read_as_strings(files):
    frame = pd.DataFrame(
        {"image_id": [1, 2], "path": [str(p) for p in files["images"][:2]], "label_name": ["df", "nv"]}
    )
    result = invoke("data", "check", "--dataset", "manifest", "--data-dir", _manifest(files, "ints.parquet", frame))
    assert result.exit_code == 0, result.output
    assert "2 listed, 2 readable" in result.stdout


# --- a release where some images have a lesion mask and others none -------------------------------


def test_data_check_with_some_masks_missing(files, tmp_path):
    data = tmp_path / "ham"
    shutil.copytree(files["data"], data)
    for mask in sorted((data / "HAM10000_segmentations_lesion_tschandl").glob("*.png"))[:5]:
        mask.unlink()
    result = invoke("data", "check", "--dataset", "ham10000", "--data-dir", data)
    assert result.exit_code == 0, result.output
    assert "9 found, 5 without mask, 0 unreadable" in result.stdout


def test_the_manifest_holds_none_for_a_missing_mask_whatever_pandas_read(files, tmp_path):
    from audit.data import load_dataset

    data = tmp_path / "ham"
    shutil.copytree(files["data"], data)
    (data / "HAM10000_segmentations_lesion_tschandl" / "ISIC_0000000_segmentation.png").unlink()
    manifest = load_dataset("ham10000", data).manifest
    assert manifest["mask_path"].iloc[0] is None and isinstance(manifest["mask_path"].iloc[1], str)
    frame = pd.DataFrame(
        {"path": [str(p) for p in files["images"][:3]], "label_name": ["df"] * 3, "mask_path": [np.nan, "", None]}
    )
    loaded = load_dataset("manifest", _manifest(files, "nan-masks.parquet", frame)).manifest
    assert loaded["mask_path"].tolist() == [None, None, None]


# --- report, compare, baseline ---------------------------------------------------------------------

RUN_FOLDERS = [
    ("missing", lambda f, t: t / "nope", "no run at"),
    ("a file", lambda f, t: f["text"], "not a run directory"),
    ("no run.json", lambda f, t: f["folder"], "not a run directory"),
    ("run.json of another tool", lambda f, t: _run_json(t, b'{"tool": "other"}'), "is not a cam-audit run file"),
    ("run.json cut short", lambda f, t: _run_json(t, b'{"model": {"cla'), "is not a cam-audit run file"),
    ("no explanations", lambda f, t: _copy_run(f, t, drop="explanations"), "has no explanations yet"),
    ("damaged explanations", lambda f, t: _copy_run(f, t, damage=True), "cannot read the explanations"),
]


def _run_json(tmp_path: Path, content: bytes) -> Path:
    folder = tmp_path / "20261201-110000-cccccccc"
    folder.mkdir()
    (folder / "run.json").write_bytes(content)
    return folder


def _copy_run(files, tmp_path: Path, drop: str | None = None, damage: bool = False) -> Path:
    folder = tmp_path / files["run"].name
    shutil.copytree(files["run"], folder)
    if drop:
        shutil.rmtree(folder / drop)
    if damage:
        for part in (folder / "explanations").glob("*.parquet"):
            part.write_bytes(b"PAR1 not parquet PAR1")
    return folder


@pytest.mark.parametrize(("case", "make", "message"), RUN_FOLDERS, ids=[c[0] for c in RUN_FOLDERS])
def test_report_of_a_bad_run_folder(files, tmp_path, case, make, message):
    folder = make(files, tmp_path)
    assert_bad_input(invoke("report", folder), message)
    if folder.is_dir():
        assert not (folder / "report.html").exists() and not (folder / "summary.json").exists()


@pytest.mark.parametrize(("case", "make", "message"), RUN_FOLDERS, ids=[c[0] for c in RUN_FOLDERS])
def test_compare_with_a_bad_baseline(files, tmp_path, case, make, message):
    assert_bad_input(invoke("compare", make(files, tmp_path), files["run"]), message)


@pytest.mark.parametrize(("case", "make", "message"), RUN_FOLDERS[:5], ids=[c[0] for c in RUN_FOLDERS[:5]])
def test_baseline_of_a_bad_run_folder(files, tmp_path, case, make, message):
    assert_bad_input(invoke("baseline", make(files, tmp_path)), message)


def test_report_with_a_bad_threshold(files):
    assert_bad_input(invoke("report", files["run"], "--off-object-warn", "2"), "off_object_warn must be in [0, 1]")


# --- data synth, fetch, bench, demo, explain ---------------------------------------------------------


def test_synth_into_an_existing_file(files):
    assert_bad_input(invoke("data", "synth", "--out", files["text"], "--images", "10"), "is a file")


def test_synth_with_a_bad_shortcut(tmp_path):
    assert_bad_input(invoke("data", "synth", "--out", tmp_path / "s", "--shortcut", "df=laser"), "laser")
    assert not (tmp_path / "s").exists()


def test_fetch_into_an_existing_file(files):
    assert_bad_input(
        invoke("fetch", "ham10000", "--dest", files["text"], "--base-url", "http://127.0.0.1:9"), "is a file"
    )


def test_bench_engine_with_an_unknown_architecture():
    assert_bad_input(invoke("bench", "engine", "--arch", "resnet1000"), "unknown architecture 'resnet1000'")


def test_bench_on_a_missing_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_bad_input(invoke("bench", "engine", "--device", "cuda"), "no CUDA device is available")


def test_demo_into_an_existing_file(files):
    assert_bad_input(invoke("demo", "--out", files["text"]), "is a file")


def test_train_with_an_unknown_architecture(files, tmp_path):
    result = invoke(
        "train",
        "--dataset",
        "synthetic",
        "--data-dir",
        files["data"],
        "--arch",
        "resnet1000",
        "--out",
        tmp_path / "m.pt",
    )
    assert_bad_input(result, "unknown architecture 'resnet1000'")


def test_train_into_a_folder(files):
    result = invoke(
        "train", "--dataset", "synthetic", "--data-dir", files["data"], "--arch", "resnet18", "--out", files["folder"]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_explain_with_a_bad_checkpoint(files, tmp_path):
    result = invoke("explain", files["images"][0], "--checkpoint", files["truncated"], "--out", tmp_path / "o")
    assert_bad_input(result, "not a readable torch checkpoint")
    assert not (tmp_path / "o").exists()


def test_an_unexpected_failure_is_one_line_with_its_own_exit_code(monkeypatch, files):
    def broken(*args, **kwargs):
        raise RuntimeError("something nobody planned for\nsecond line")

    monkeypatch.setattr("audit.report.build_report", broken)
    result = invoke("report", files["run"])
    assert result.exit_code == 3, result.output
    assert result.stderr.splitlines()[0].startswith("error: internal error: RuntimeError: something nobody planned for")
    assert "Traceback" not in result.output
