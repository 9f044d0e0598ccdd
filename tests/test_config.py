"""`audit run --config FILE.toml`: every option of the command, validated key by key, flags on top."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from audit.cli import main, run_command
from audit.config import ALIASES, COMPUTED, ConfigError, RunConfig, build_config, read_config_file
from audit.pipeline.run import RunError, resume_audit
from audit.report.thresholds import ThresholdError, Thresholds

JOBS = Path(__file__).resolve().parents[1] / "jobs"
NOT_CONFIG = {"config_file", "resume_dir", "batch_delay"}  # what to do, not how: command line only


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "audit.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_every_option_of_audit_run_is_a_config_key_and_back():
    options = {p.name for p in run_command.params} - NOT_CONFIG
    thresholds = {name for name in options if name.startswith("threshold_")}
    fields = set(RunConfig.__dataclass_fields__)
    assert options - thresholds - set(ALIASES) == fields - {"thresholds"}
    assert {name.removeprefix("threshold_") for name in thresholds} == set(Thresholds.__dataclass_fields__)
    assert set(COMPUTED) < fields


def test_a_file_sets_options_and_resolves_paths_against_its_folder(tmp_path):
    path = _write(
        tmp_path,
        """
dataset = "synthetic"
data_dir = "data"
checkpoint = "models/model.pt"
out = "../runs"
batch_size = 8
targets = "both"
report = false
tolerance = 0
[thresholds]
off_object_warn = 0.3
""",
    )
    config = build_config(path, {})
    assert config.data_dir == str(tmp_path / "data") and config.model == str(tmp_path / "models" / "model.pt")
    assert config.out == str(tmp_path.parent / "runs")
    assert (config.batch_size, config.targets, config.report, config.tolerance) == (8, "both", False, 0)
    assert config.thresholds == {"off_object_warn": 0.3} and config.audit_name == "data"


def test_command_line_flags_override_the_file_and_thresholds_merge(tmp_path):
    path = _write(
        tmp_path,
        'dataset = "synthetic"\ncheckpoint = "/m.pt"\nbatch_size = 8\n'
        "[thresholds]\noff_object_warn = 0.3\nmin_rows = 5\n",
    )
    config = build_config(path, {"batch_size": 2, "thresholds": {"min_rows": 20}})
    assert config.batch_size == 2 and config.thresholds == {"off_object_warn": 0.3, "min_rows": 20}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bach_size = 4", r"audit.toml: unknown option 'bach_size' \(did you mean 'batch_size'\?\)"),
        ('batch_size = "4"', r"audit.toml: batch_size must be an integer, got '4' \(a string\)"),
        ("batch_size = 4.5", "batch_size must be an integer, got 4.5"),
        ("report = 1", "report must be true or false, got 1"),
        ('targets = "all"', "targets must be one of 'pred', 'label', 'both', got 'all'"),
        ("limit = 0", "limit must be >= 1, got 0"),
        ("thresholds = 3", "thresholds must be a table"),
        ("data_dir = ['a']", r"data_dir must be a string, got \['a'\] \(a list\)"),
        ("[thresholds]\noff_object = 0.3", "unknown thresholds: off_object"),
        ("[thresholds]\nmin_rows = 2.5", "threshold min_rows must be an integer"),
        ("[thresholds]\noff_object_warn = 0.9", r"off_object_warn \(0.9\) must not exceed off_object_fail"),
        ("batch_size = ", "is not valid TOML"),
        ("tolerance = nan", "tolerance must be a finite number, got nan"),
        ("[thresholds]\nmin_rows = inf", "threshold min_rows must be an integer"),
        ('name = "a/b"', "name must be a folder name"),
        ("started = 2026-11-22T02:00:00Z", "unknown option 'started'"),
        ('report = false\nfail_on = "fail"', "fail_on and baseline need the report stage"),
    ],
)
def test_bad_keys_and_values_are_errors_that_name_the_key(tmp_path, text, message):
    path = _write(tmp_path, f'dataset = "synthetic"\ncheckpoint = "m.pt"\n{text}\n')
    with pytest.raises((ConfigError, ThresholdError), match=message):
        build_config(path, {})


def test_a_missing_file_or_option_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        read_config_file(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="needs --model"):
        build_config(_write(tmp_path, 'dataset = "synthetic"'), {})


def test_the_documented_example_is_valid():
    data = read_config_file(JOBS / "ham10000.toml")
    config = build_config(JOBS / "ham10000.toml", {})
    assert config.dataset == "ham10000" and config.keep == 30 and config.fail_on == "fail"
    assert config.baseline == "s3://cam-audit-runs/ham10000-nightly/baseline" and "thresholds" in data
    assert config.data_dir == "s3://cam-audit-data/ham10000"  # URIs are kept, not resolved against the folder


def test_cli_reads_the_file_and_its_flags_win(tmp_path):
    """Through the command: an unreachable address from the file, then one from the command line."""
    path = _write(tmp_path, f'dataset = "synthetic"\ncheckpoint = "m.pt"\nout = "{tmp_path / "runs"}"\n')
    path.write_text(path.read_text() + 'address = "127.0.0.1:1"\n')
    runner = CliRunner()
    from_file = runner.invoke(main, ["run", "--config", str(path)])
    assert from_file.exit_code == 2 and "cannot reach the Ray cluster at 127.0.0.1:1" in from_file.stderr
    flag = runner.invoke(main, ["run", "--config", str(path), "--address", "127.0.0.1:2"])
    assert flag.exit_code == 2 and "cannot reach the Ray cluster at 127.0.0.1:2" in flag.stderr
    both = runner.invoke(main, ["run", "--config", str(path), "--resume", str(tmp_path)])
    assert both.exit_code == 2 and "leave out --config" in both.stderr
    assert not (tmp_path / "runs").exists()


def test_a_bad_config_is_one_line_in_a_real_process(tmp_path):
    typo = _write(tmp_path, "batch_size = true\n")
    command = [sys.executable, "-m", "audit.cli", "run", "--config", str(typo)]
    wrong = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and wrong.stderr.startswith("error: ")
    assert "batch_size must be an integer, got True" in wrong.stderr and "Traceback" not in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1


def test_the_dataset_kind_and_the_default_audit_name():
    with pytest.raises(ConfigError, match="dataset must be one of 'ham10000'"):
        RunConfig(dataset="ham", model="m.pt")
    assert RunConfig(dataset="ham10000", model="m.pt").audit_name == "ham10000"
    assert RunConfig(dataset="manifest", model="m.pt", data_dir="/x/skin.csv").audit_name == "skin"
    assert RunConfig(dataset="manifest", model="m.pt", data_dir="/x/skin.csv", name="n").audit_name == "n"


def test_resume_cannot_change_what_a_run_computes_or_where_it_lies(tmp_path, monkeypatch):
    from audit.errors import CheckpointError

    config = RunConfig(dataset="synthetic", model=str(tmp_path / "m.pt"), out=str(tmp_path), masks="auto")
    info = {"run_id": "r", "status": "interrupted", "config": config.to_dict(), "model": {"classes": ["a"]}}
    (tmp_path / "run.json").write_text(json.dumps(info))
    with pytest.raises(RunError, match="cannot change masks"):
        resume_audit(tmp_path, changes={"masks": "none", "batch_size": 4})
    with pytest.raises(RunError, match="cannot change out"):
        resume_audit(tmp_path, changes={"out": str(tmp_path / "elsewhere")})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint not found"):  # the same file, typed relative: accepted
        resume_audit(tmp_path, changes={"checkpoint": "m.pt", "batch_size": 4})


def test_a_run_location_with_store_options_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="out must be a URI without options"):
        RunConfig(dataset="synthetic", model="m.pt", out="s3://bucket/audits?endpoint_override=127.0.0.1:9000")
