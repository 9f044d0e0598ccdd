"""`audit compare` on hand-made runs: deltas, regressions beyond the tolerance, new and resolved flags,
runs that differ in model or classes, the report section, compare.json and the exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from audit import history
from audit.cli import main
from audit.report import Thresholds, build_report
from audit.report.compare import compare_runs
from audit.report.load import load_run
from tests.report_runs import class_rows, write_run

CLASSES = ["akiec", "bcc", "df", "mel"]


def _rows(classes: list[str], off: dict[str, int], n: int = 40) -> list[dict]:
    return [row for label, name in enumerate(classes) for row in class_rows(label, n, classes, off=off.get(name, 0))]


@pytest.fixture
def runs(tmp_path):
    """The baseline: mel mostly off-object (fail). The run: bcc goes from 0% to 50% off-object,
    df from 10% to 12.5% (within the tolerance), mel recovers."""
    baseline = write_run(tmp_path / "20261120-010000-aaaaaaaa", _rows(CLASSES, {"df": 4, "mel": 30}), CLASSES)
    run = write_run(tmp_path / "20261121-010000-bbbbbbbb", _rows(CLASSES, {"bcc": 20, "df": 5, "mel": 2}), CLASSES)
    return baseline, run


def _compare(baseline, run, tolerance=0.05, thresholds=None):
    return compare_runs(load_run(baseline), load_run(run), thresholds or Thresholds(), tolerance)


def test_a_rate_that_rose_beyond_the_tolerance_is_a_regression(runs):
    comparison = _compare(*runs)
    classes = {c.label_name: c for c in comparison.classes}
    bcc = classes["bcc"]
    assert bcc.status == "fail" and bcc.regressed
    consensus = next(c for c in bcc.regressed if (c.kind, c.method) == ("off_object", "consensus"))
    assert (consensus.baseline, consensus.run) == (0.0, 0.5) and consensus.delta == pytest.approx(0.5)
    assert [(f.kind, f.method) for f in bcc.new_flags if f.method == "consensus"] == [("off_object", "consensus")]
    assert not classes["df"].regressed and classes["df"].status == "pass"  # +2.5 points, tolerance 5
    assert {c.kind for c in bcc.changes} == {"low_agreement", "off_object", "context_reliance"}
    context = next(c for c in bcc.changes if c.kind == "context_reliance")
    assert (context.baseline, context.run, context.delta) == (None, None, None)  # neither run measured it
    assert comparison.status == "fail" and comparison.to_dict()["regressed"] == ["bcc (pred)"]


def test_resolved_flags_are_listed_and_are_no_regression(runs):
    mel = next(c for c in _compare(*runs).classes if c.label_name == "mel")
    assert mel.baseline.status == "fail" and mel.run.status == "pass"
    assert {f.method for f in mel.resolved_flags} >= {"consensus", "cam", "gradcam", "gradcampp"}
    assert mel.status == "pass" and not mel.regressed and not mel.new_flags


def test_within_the_tolerance_a_new_flag_is_a_warning(runs):
    comparison = _compare(*runs, tolerance=0.6)
    bcc = next(c for c in comparison.classes if c.label_name == "bcc")
    assert not bcc.regressed and bcc.new_flags and bcc.status == "warn"
    assert comparison.status == "warn" and comparison.reaches("warn") and not comparison.reaches("fail")


def test_escalated_and_eased_flags(tmp_path):
    baseline = write_run(tmp_path / "b", _rows(CLASSES, {"bcc": 20, "df": 40}), CLASSES)  # bcc warn, df fail
    run = write_run(tmp_path / "r", _rows(CLASSES, {"bcc": 40, "df": 20}), CLASSES)  # bcc fail, df warn
    classes = {c.label_name: c for c in _compare(baseline, run, tolerance=1.0).classes}
    assert {f.method for f in classes["bcc"].escalated} >= {"consensus"} and classes["bcc"].status == "warn"
    assert {f.method for f in classes["df"].eased} >= {"consensus"} and classes["df"].status == "pass"


def test_classes_too_small_to_judge_never_regress(tmp_path):
    baseline = write_run(tmp_path / "b", _rows(CLASSES, {}, n=5), CLASSES)
    run = write_run(tmp_path / "r", _rows(CLASSES, {"bcc": 5}, n=5), CLASSES)
    bcc = next(c for c in _compare(baseline, run).classes if c.label_name == "bcc")
    assert not bcc.judged and bcc.changes and not bcc.regressed and bcc.status == "pass"


def test_runs_of_different_models_and_classes_are_compared_where_they_overlap(tmp_path):
    other = ["akiec", "bcc", "df", "nv"]
    baseline = write_run(tmp_path / "b", _rows(CLASSES, {}), CLASSES, thresholds={"off_object_warn": 0.4})
    run = write_run(tmp_path / "r", _rows(other, {"bcc": 20}), other, model_sha="1" * 64)
    comparison = _compare(baseline, run)
    assert [c.label_name for c in comparison.classes] == ["bcc", "akiec", "df"]  # fail first
    assert comparison.only_in_baseline == ["mel (pred)"] and comparison.only_in_run == ["nv (pred)"]
    notes = " | ".join(comparison.differences)
    assert "the models differ" in notes and "only the baseline has mel" in notes and "only this run has nv" in notes
    assert "judged with this run's thresholds" in notes and "off_object_warn" in notes


def _set_info(run_dir, **values):
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**info, **values}))


def test_runs_computed_in_different_precisions_say_so(tmp_path):
    """bf16 autocast moves a random model's maps: a comparison across precisions is flagged, also
    against a run from before run.json recorded it (its device then decided: bf16 on a GPU)."""
    baseline = write_run(tmp_path / "b", _rows(CLASSES, {}), CLASSES)
    run = write_run(tmp_path / "r", _rows(CLASSES, {}), CLASSES)
    _set_info(baseline, execution={"device": "cpu", "precision": "fp32", "batch_size": 32})
    _set_info(run, execution={"device": "cpu", "precision": "fp32", "batch_size": 64})
    assert not any("precision" in note for note in _compare(baseline, run).differences)
    _set_info(run, execution={"device": "cuda", "precision": "bf16", "batch_size": 256})
    assert "precision 'fp32' -> 'bf16'" in " | ".join(_compare(baseline, run).differences)
    _set_info(baseline, execution={}, attempts=[{"resources": {"gpus_per_actor": 1.0}}])
    assert not any("precision" in note for note in _compare(baseline, run).differences)


def test_compare_command_writes_json_and_a_report_section_and_exits_by_status(runs):
    baseline, run = runs
    runner = CliRunner()
    result = runner.invoke(main, ["compare", str(baseline), str(run), "--json", "--gallery", "0"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads((run / "compare.json").read_text())
    assert printed["format"] == "cam-audit-compare/1" and printed["status"] == "fail"
    assert printed["baseline_run_id"] == baseline.name and printed["run_id"] == run.name
    assert "bcc (pred) regressed" in result.stderr
    html = (run / "report.html").read_text()
    assert 'id="comparison"' in html and baseline.name in html and "resolved off-object (CAM, " in html

    assert runner.invoke(main, ["compare", str(baseline), str(run), "--fail-on", "fail"]).exit_code == 1
    lenient = ["compare", str(baseline), str(run), "--tolerance", "0.6"]
    assert runner.invoke(main, [*lenient, "--fail-on", "fail"]).exit_code == 0
    assert runner.invoke(main, [*lenient, "--fail-on", "warn"]).exit_code == 1
    # thresholds given here apply to both runs: nothing is off-object below 5% energy
    calm = runner.invoke(main, ["compare", str(baseline), str(run), "--energy-min", "0.05", "--fail-on", "warn"])
    assert calm.exit_code == 0, calm.output


def test_compare_command_rejects_bad_input_with_exit_2(runs, tmp_path):
    baseline, run = runs
    runner = CliRunner()
    missing = runner.invoke(main, ["compare", str(tmp_path / "nope"), str(run)])
    assert missing.exit_code == 2 and "no run at" in missing.stderr
    same = runner.invoke(main, ["compare", str(run), str(run)])
    assert same.exit_code == 2 and "cannot be its own baseline" in same.stderr
    bad = runner.invoke(main, ["compare", str(baseline), str(run), "--tolerance", "2"])
    assert bad.exit_code == 2


def test_the_run_gate_counts_the_comparison(runs):
    baseline, run = runs
    alone = build_report(run, gallery=0)
    compared = build_report(run, gallery=0, baseline=baseline)
    assert alone.status == "warn" and not alone.reaches("fail")  # bcc's new flag is a warning on its own
    assert compared.reaches("fail")  # ...and a regression against the baseline
    assert any(line.startswith("compared with 20261120-010000-aaaaaaaa: FAIL") for line in compared.headline())


# --- audit run with a baseline: the command's own steps, with the Ray job replaced by a hand-made run ----


@pytest.fixture
def fake_job(monkeypatch):
    """`audit run` whose job writes a hand-made run (bcc 50% off-object) into the audit's history."""

    def run_audit(config, execution):
        run_dir = history.create_run_dir(Path(config.out) / config.audit_name, "20261122-020000-cccccccc")
        write_run(run_dir, _rows(CLASSES, {"bcc": 20}), CLASSES)
        history.mark_latest(run_dir)
        return run_dir

    monkeypatch.setattr("audit.pipeline.run.run_audit", run_audit)
    return ["run", "--dataset", "synthetic", "--checkpoint", "m.pt", "--name", "nightly", "--gallery", "0"]


def test_run_compares_with_latest_as_it_was_before_the_run_and_keeps_it(fake_job, tmp_path):
    previous = write_run(tmp_path / "nightly" / "20261121-020000-bbbbbbbb", _rows(CLASSES, {}), CLASSES)
    history.mark_latest(previous)
    latest = tmp_path / "nightly" / "latest"
    result = CliRunner().invoke(main, [*fake_job, "--out", str(tmp_path), "--baseline", str(latest), "--keep", "1"])
    assert result.exit_code == 0, result.output
    new = Path(result.stdout.strip().splitlines()[-1])
    assert json.loads((new / "compare.json").read_text())["baseline_run_id"] == previous.name
    assert latest.resolve() == new.resolve() and previous.is_dir()  # the baseline in use is kept
    gated = CliRunner().invoke(
        main, [*fake_job, "--out", str(tmp_path), "--baseline", str(previous), "--fail-on", "fail"]
    )
    assert gated.exit_code == 1, gated.output  # bcc regressed against the baseline


def test_run_with_a_baseline_pointer_not_yet_set_runs_without_comparing(fake_job, tmp_path):
    pointer = tmp_path / "nightly" / "baseline"
    result = CliRunner().invoke(main, [*fake_job, "--out", str(tmp_path), "--baseline", str(pointer)])
    assert result.exit_code == 0, result.output
    assert "not compared with a baseline" in result.stderr
    assert not (Path(result.stdout.strip().splitlines()[-1]) / "compare.json").exists()


def test_a_later_report_keeps_the_comparison_in_step(runs):
    baseline, run = runs
    build_report(run, gallery=0, baseline=baseline, tolerance=0.6)
    again = build_report(run, gallery=0, overrides={"energy_min": 0.05})  # nothing is off-object now
    assert again.comparison is not None and again.comparison.baseline_id == baseline.name
    assert json.loads((run / "compare.json").read_text())["tolerance"] == 0.6
    assert json.loads((run / "compare.json").read_text())["status"] == "pass"


def test_runs_that_share_no_class_cannot_be_compared(tmp_path):
    baseline = write_run(tmp_path / "b", _rows(["a", "b"], {}), ["a", "b"])
    run = write_run(tmp_path / "r", _rows(["c", "d"], {}), ["c", "d"])
    result = CliRunner().invoke(main, ["compare", str(baseline), str(run)])
    assert result.exit_code == 2 and "nothing to compare" in result.stderr
