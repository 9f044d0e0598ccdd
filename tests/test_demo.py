"""`audit demo` end to end at small sizes: the planted shortcut class, and only it, is flagged off-object."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from audit.cli import main
from audit.config import RunConfig
from audit.demo import DemoSettings, run_demo
from audit.explain.sanity import SANITY_FILE
from audit.history import runs

SMALL = DemoSettings(images=350, image_size=128, epochs=6)


@pytest.fixture(scope="module")
def first_demo(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    return out, run_demo(out, SMALL, lines.append), lines


def test_demo_flags_the_shortcut_class_and_only_it(first_demo):
    _, result, _ = first_demo
    summary = json.loads((result.run_dir / "summary.json").read_text())
    off_object = {
        c["label_name"]
        for c in summary["classes"]
        if any(f["kind"] == "off_object" and f["stands"] for f in c["flags"])
    }
    assert off_object == {"df"}  # by a method that passed the sanity check
    context = {c["label_name"] for c in summary["classes"] if any(f["kind"] == "context_reliance" for f in c["flags"])}
    assert context == {"df"}  # the model keeps answering df with the lesion hidden, and no other class
    assert next(c for c in summary["classes"] if c["label_name"] == "df")["intervention"]["verdict"] == "confirmed"
    assert result.confirmed
    assert all(c["status"] == "pass" for c in summary["classes"] if c["label_name"] != "df")
    assert result.caught and result.false_flags == [] and result.ok
    assert result.accuracy > 0.8  # the model learnt the task: the shortcut is what it uses for df
    planted, found, sanity, report = result.lines()
    assert "df" in planted and found.startswith("Found: df is flagged off-object") and "no other class" in found
    assert "confirmed by intervention" in found
    # a GAP -> linear ResNet: CAM and Grad-CAM follow the classifier, Grad-CAM++ barely does (DESIGN.md)
    verdict = summary["sanity"]["verdict"]
    assert verdict["cam"] == verdict["gradcam"] == "pass" and verdict["gradcampp"] == "fail", summary["sanity"]
    assert summary["sanity"]["images"] == 64 and len(summary["sanity"]["steps"]) == 4
    assert sanity.startswith("Sanity check: CAM pass") and "Grad-CAM++ FAIL" in sanity
    html = (result.run_dir / "report.html").read_text()
    assert 'id="intervention-verdicts"' in html and 'id="faithfulness"' in html
    assert 'id="sanity-verdict"' in html and 'id="sanity-steps"' in html and 'alt="Sanity check: similarity' in html
    assert report == f"Report: {result.run_dir / 'report.html'}"


def test_second_demo_reuses_data_and_model(first_demo, monkeypatch):
    out, first, lines = first_demo
    copied = []

    def same_sanity_check(state, plan, checkpoint_ref) -> float:
        # The same model, images and options as the first run: its sanity check (deterministic: a fixed
        # sample and fixed seeds) is what this run would compute, minutes later. Everything else runs.
        before = json.loads((first.run_dir / "run.json").read_text())
        assert state.config.computed == RunConfig.from_dict(before["config"]).computed
        assert state.info["model"]["sha256"] == before["model"]["sha256"]
        assert state.info["dataset"]["fingerprint"] == before["dataset"]["fingerprint"]
        shutil.copy(first.run_dir / SANITY_FILE, state.run_dir / SANITY_FILE)
        copied.append(state.run_dir.resolve())
        return 0.0

    monkeypatch.setattr("audit.pipeline.run._run_sanity", same_sanity_check)
    assert any(line.startswith("demo: generating") for line in lines)
    assert any(line.startswith("demo: training") for line in lines)
    model_time = (out / "model.pt").stat().st_mtime_ns
    command = ["demo", "--out", str(out), "--images", "350", "--image-size", "128", "--epochs", "6"]
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 0, result.output
    assert "reusing the synthetic images" in result.stderr and "reusing the model" in result.stderr
    assert (out / "model.pt").stat().st_mtime_ns == model_time
    assert result.stdout.strip().splitlines()[-1].startswith("Report: ")
    assert len(runs(out / "runs")) == 2
    assert (out / "runs" / "latest").resolve() == max(runs(out / "runs"))
    assert copied == [max(runs(out / "runs")).resolve()]  # the second run did reach its sanity check
