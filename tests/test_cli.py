"""The command line: help, exit codes, one-line errors, `audit bench engine`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from audit.cli import main

SMALL = ["--arch", "resnet18", "--batch-size", "2", "--image-size", "64", "--repeats", "2", "--warmup", "1"]


def test_help_lists_the_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "bench" in result.output
    assert CliRunner().invoke(main, ["bench", "engine", "--help"]).exit_code == 0


def test_bench_engine_json_has_the_ratios():
    result = CliRunner().invoke(main, ["bench", "engine", *SMALL, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["ratio_vs_forward"] > 0 and report["speedup_vs_peers"] > 0
    assert report["evidence_ms"] > 0 and report["evidence_vs_forward"] == report["evidence_ms"] / report["forward_ms"]
    assert set(report["peer_ms"]) == {"pytorch-grad-cam GradCAM", "pytorch-grad-cam GradCAMPlusPlus", "torchcam CAM"}
    on_gpu = torch.cuda.is_available()  # the default device: cuda with bfloat16 autocast where there is one
    assert report["device"] == ("cuda" if on_gpu else "cpu")
    assert report["dtype"] == ("bfloat16 autocast" if on_gpu else "float32")


def test_bench_engine_text_without_peers():
    result = CliRunner().invoke(main, ["bench", "engine", *SMALL, "--no-peers"])
    assert result.exit_code == 0, result.output
    assert "a forward" in result.output and "faster" not in result.output


def test_bad_input_exits_2_with_one_line():
    completed = subprocess.run(
        [sys.executable, "-m", "audit.cli", "bench", "engine", "--arch", "not_a_model", "--repeats", "1"],
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        "error: unknown architecture 'not_a_model': expected a torchvision classification model "
        "such as resnet50, densenet121 or efficientnet_b0"
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_missing_gpu_is_a_clear_error():
    result = CliRunner().invoke(main, ["bench", "engine", *SMALL, "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA device" in result.output


def test_bench_report_times_the_report_of_a_run_with_a_partial_shortcut():
    result = CliRunner().invoke(main, ["bench", "report", "--rows", "300", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["rows"] == 300 and report["seconds"] > 0 and report["html_bytes"] > 0
    assert report["cluster_flags"] >= 1 and report["status"] == "fail"  # the corner third of df, as a cluster
