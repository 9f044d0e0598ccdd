"""The report stage on hand-made runs with known answers: aggregation, flag rules, summary.json,
exit codes, and report.html (escaping, self-containment, pictures)."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from click.testing import CliRunner
from PIL import Image

from audit.cli import main
from audit.data.synthetic import Shortcut, SyntheticSpec, generate
from audit.report import Thresholds, build_report
from audit.report.aggregate import counted_pairs, group_bootstrap, indicators, summarize
from audit.report.flags import assess, judge
from audit.report.load import class_mean_maps, load_run
from audit.report.thresholds import ThresholdError
from tests.report_runs import MAP_SHAPE, class_rows, error_row, score_row, write_run

CLASSES = ["akiec", "bcc", "df", "mel"]
XSS = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>']


def _class(label: int, n: int, off: int = 0, low: int = 0, prefix: str = "", **values) -> list[dict]:
    return class_rows(label, n, CLASSES, off, low, prefix, **values)


def _stats(rows: list[dict], thresholds: Thresholds | None = None, proportional: bool = False):
    thresholds = thresholds or Thresholds()
    frame = pd.DataFrame(rows)
    pairs = counted_pairs(proportional)
    return summarize(frame, indicators(frame, thresholds, pairs), thresholds), pairs


# --- aggregation -------------------------------------------------------------------------


def test_indicators_follow_the_thresholds_and_leave_undefined_scores_undefined():
    rows = pd.DataFrame(
        [
            score_row("a", 0, CLASSES, agreement=0.49, energy=0.51, mask_area=0.6),
            score_row("b", 0, CLASSES, agreement=0.5, energy=0.49, mask_area=0.6),
            score_row("c", 0, CLASSES, agreement=None, energy=None),
            error_row("d", "akiec", "decode", "broken"),
        ]
    )
    flags = indicators(rows, Thresholds(), counted_pairs(False))
    assert flags["low_agreement:all"].tolist()[:2] == [1.0, 0.0]
    assert flags["off_object:consensus"].tolist()[:2] == [0.0, 1.0]
    assert flags.iloc[2].isna().all()  # null scores (empty maps, no mask) are not counted either way
    assert flags.iloc[3].isna().all()  # nor are error rows


def test_off_object_needs_both_little_energy_and_no_lift_over_an_even_map():
    """A coarse map centred on a small lesion (15% of the image) holds 30% of its mass there: on the
    object. A corner shortcut holds 5%: off. Without mask_area only the absolute rule applies."""
    rows = pd.DataFrame(
        [
            score_row("centred", 0, CLASSES, energy=0.3, mask_area=0.15),
            score_row("corner", 0, CLASSES, energy=0.05, mask_area=0.15),
            score_row("large lesion", 0, CLASSES, energy=0.45, mask_area=0.8),
            score_row("old run", 0, CLASSES, energy=0.3, mask_area=None),
        ]
    )
    flags = indicators(rows, Thresholds(), counted_pairs(False))
    assert flags["off_object:consensus"].tolist() == [0.0, 1.0, 1.0, 1.0]
    stricter = indicators(rows, Thresholds(lift_min=2.5), counted_pairs(False))
    assert stricter["off_object:consensus"].tolist() == [1.0, 1.0, 1.0, 1.0]


def test_proportional_cam_and_gradcam_do_not_count_as_agreement():
    row = score_row("a", 0, CLASSES, agree_spearman_cam_gradcam=1.0, agreement=0.3)
    frame = pd.DataFrame([row])
    everything = indicators(frame, Thresholds(), counted_pairs(False))
    counted = indicators(frame, Thresholds(), counted_pairs(True))
    assert everything["low_agreement:all"].item() == 0.0  # mean (1 + .3 + .3) / 3 = .53
    assert counted["low_agreement:all"].item() == 1.0  # mean of the two counted pairs: .3


def test_summarize_counts_rates_and_accuracy():
    rows = _class(0, 10, off=4) + [error_row("x", "akiec", "decode", "bad", label=0)]
    rows[0]["correct"] = False
    stats, _ = _stats(rows)
    assert (stats.n, stats.ok, stats.errors) == (11, 10, 1)
    assert stats.accuracy == pytest.approx(0.9)
    off = stats.rates["off_object"]["consensus"]
    assert (off.hits, off.scored, off.value) == (4, 10, 0.4)
    assert off.low <= 0.4 <= off.high
    assert stats.energy["consensus"]["median"] == pytest.approx(0.8)


def test_bootstrap_interval_matches_the_binomial_one_for_independent_rows():
    rng = np.random.default_rng(3)
    values = (rng.random(400) < 0.3).astype(float)[:, None]
    low, high = group_bootstrap(values, np.arange(400), 4000, 0.95)
    p = values.mean()
    half = 1.96 * np.sqrt(p * (1 - p) / 400)
    assert low[0] == pytest.approx(p - half, abs=0.01)
    assert high[0] == pytest.approx(p + half, abs=0.01)


def test_bootstrap_resamples_groups_not_images():
    """Ten photos of one lesion are one piece of evidence: the interval is wider than for ten lesions."""
    values = np.array([1.0] * 10 + [0.0] * 10)[:, None]
    one_lesion = np.array(["L0"] * 10 + [f"L{i}" for i in range(1, 11)])
    ten_lesions = np.array([f"L{i}" for i in range(20)])
    low_grouped, _ = group_bootstrap(values, one_lesion, 2000, 0.95)
    low_independent, _ = group_bootstrap(values, ten_lesions, 2000, 0.95)
    assert low_grouped[0] < 0.1 < low_independent[0] - 0.1


def test_bootstrap_of_an_unscored_column_is_undefined():
    low, high = group_bootstrap(np.full((5, 1), np.nan), np.arange(5), 200, 0.95)
    assert np.isnan(low[0]) and np.isnan(high[0])


# --- flag rules ---------------------------------------------------------------------------


def test_a_mostly_off_object_class_fails_with_method_value_and_threshold():
    stats, pairs = _stats(_class(2, 30, off=25))
    flags = judge(stats, Thresholds(), pairs)
    consensus = next(f for f in flags if f.method == "consensus")
    assert (consensus.kind, consensus.status, consensus.threshold) == ("off_object", "fail", 0.5)
    assert consensus.value == pytest.approx(25 / 30)
    assert {f.method for f in flags} == {"cam", "gradcam", "gradcampp", "consensus"}
    assert all(f.kind == "off_object" for f in flags)


def test_a_rate_between_the_warn_and_fail_rates_warns():
    stats, pairs = _stats(_class(0, 100, low=40))
    flags = judge(stats, Thresholds(), pairs)
    overall = next(f for f in flags if f.method == "all")
    assert (overall.kind, overall.status) == ("low_agreement", "warn")
    assert 0.25 <= overall.low < 0.5


def test_a_small_class_is_not_flagged_on_noise_alone():
    """4 of 12 off-object is a 33% point estimate, above the 25% warn rate, but its interval is not."""
    stats, pairs = _stats(_class(0, 12, off=4))
    assert stats.rates["off_object"]["consensus"].value > Thresholds().off_object_warn
    assert judge(stats, Thresholds(), pairs) == []


def test_classes_below_min_rows_are_not_judged(tmp_path):
    run = write_run(tmp_path / "run", _class(0, 5, off=5) + _class(1, 20), CLASSES)
    results = {r.label_name: r for r in assess(load_run(run), Thresholds())}
    assert not results["akiec"].judged and results["akiec"].flags == []
    assert results["bcc"].judged and results["bcc"].status == "pass"


def test_the_proportional_pair_is_never_flagged():
    rows = _class(0, 30)
    for row in rows:
        row["agree_spearman_cam_gradcam"] = 0.0
    stats, pairs = _stats(rows, proportional=True)
    assert judge(stats, Thresholds(), pairs) == []
    stats, pairs = _stats(rows, proportional=False)
    assert "cam_gradcam" in {f.method for f in judge(stats, Thresholds(), pairs)}


def test_thresholds_change_the_flags_without_recomputing(tmp_path):
    run = write_run(tmp_path / "run", _class(2, 40, off=20) + _class(0, 40), CLASSES)
    strict = {r.label_name: r.status for r in assess(load_run(run), Thresholds())}
    lenient = {r.label_name: r.status for r in assess(load_run(run), Thresholds(energy_min=0.05))}
    assert strict["df"] == "warn" and lenient["df"] == "pass"
    assert strict["akiec"] == lenient["akiec"] == "pass"


def test_results_are_sorted_fail_warn_pass(tmp_path):
    rows = _class(0, 30) + _class(1, 100, low=40) + _class(2, 30, off=25) + _class(3, 30)
    statuses = [r.status for r in assess(load_run(write_run(tmp_path / "run", rows, CLASSES)), Thresholds())]
    assert statuses == ["fail", "warn", "pass", "pass"]


def test_thresholds_are_validated():
    with pytest.raises(ThresholdError, match="unknown thresholds: energy"):
        Thresholds.from_dict({"energy": 0.3})
    with pytest.raises(ThresholdError, match="min_rows must be an integer"):
        Thresholds.from_dict({"min_rows": 2.5})
    with pytest.raises(ThresholdError, match="off_object_warn"):
        Thresholds(off_object_warn=0.6, off_object_fail=0.5)
    with pytest.raises(ThresholdError, match="energy_min"):
        Thresholds.from_dict({"energy_min": "high"})


# --- summary.json and exit codes ---------------------------------------------------------


@pytest.fixture
def flagged_run(tmp_path):
    rows = _class(2, 30, off=25) + _class(1, 100, low=40) + _class(0, 30)
    rows.append(error_row("broken", "akiec", "decode", "image file is truncated", label=0))
    return write_run(tmp_path / "20261122-100000-abcdef12", rows, CLASSES)


def test_summary_json_follows_the_contract(flagged_run):
    result = build_report(flagged_run)
    summary = json.loads((flagged_run / "summary.json").read_text())
    assert summary == result.summary
    assert summary["run_id"] == "20261122-100000-abcdef12"
    assert summary["status"] == "fail"
    assert summary["thresholds"] == Thresholds().to_dict()
    assert (summary["rows"], summary["errors"]) == (161, 1)
    by_name = {c["label_name"]: c for c in summary["classes"]}
    assert set(by_name) == set(CLASSES)
    for entry in summary["classes"]:
        assert {"label", "label_name", "n", "status", "flags", "off_object", "low_agreement"} <= set(entry)
    df = by_name["df"]
    assert (df["label"], df["n"], df["status"]) == (2, 30, "fail")
    assert df["off_object"]["consensus"]["value"] == pytest.approx(25 / 30, abs=1e-4)
    flag = next(f for f in df["flags"] if f["method"] == "consensus")
    assert set(flag) >= {"kind", "status", "method", "value", "threshold"}
    assert (flag["kind"], flag["status"], flag["threshold"]) == ("off_object", "fail", 0.5)
    assert by_name["bcc"]["status"] == "warn" and by_name["akiec"]["status"] == "pass"
    assert by_name["akiec"]["errors"] == 1


@pytest.mark.parametrize(
    ("options", "code"),
    [
        (["--fail-on", "fail"], 1),
        (["--fail-on", "warn"], 1),
        ([], 0),
        (["--fail-on", "fail", "--off-object-fail", "0.9"], 0),  # df now only warns
        (["--fail-on", "warn", "--off-object-warn", "0.9", "--off-object-fail", "0.95", "--agreement-min", "0.05"], 0),
    ],
)
def test_report_exit_codes(flagged_run, options, code):
    result = CliRunner().invoke(main, ["report", str(flagged_run), *options])
    assert result.exit_code == code, result.output
    assert result.output.strip().splitlines()[-1] == f"report: {flagged_run / 'report.html'}"


def test_report_json_prints_the_summary(flagged_run):
    result = CliRunner().invoke(main, ["report", str(flagged_run), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["status"] == "fail"


def test_report_uses_the_runs_configured_thresholds(tmp_path):
    run = write_run(tmp_path / "run", _class(2, 30, off=25), CLASSES, thresholds={"off_object_fail": 0.95})
    assert build_report(run).status == "warn"
    assert (
        CliRunner().invoke(main, ["report", str(run), "--off-object-fail", "0.5", "--fail-on", "fail"]).exit_code == 1
    )


@pytest.mark.parametrize("breakage", ["no run.json", "no explanations", "bad run.json", "bad threshold"])
def test_report_on_bad_input_exits_2_with_one_line(tmp_path, breakage):
    run = write_run(tmp_path / "run", _class(0, 12), CLASSES)
    if breakage == "no run.json":
        (run / "run.json").unlink()
    elif breakage == "no explanations":
        for file in (run / "explanations").iterdir():
            file.unlink()
    elif breakage == "bad run.json":
        (run / "run.json").write_text("{not json")
    result = CliRunner().invoke(
        main, ["report", str(run), *(["--energy-min", "2"] if breakage == "bad threshold" else [])]
    )
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert "Traceback" not in result.output


# --- report.html --------------------------------------------------------------------------


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.script_text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.script_text.append(data)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Real image and mask files for the gallery."""
    return generate(
        tmp_path_factory.mktemp("report-images") / "syn",
        SyntheticSpec(images=24, height=48, width=64, shortcuts={"df": Shortcut("patch")}, seed=2),
        workers=1,
    )


@pytest.fixture
def hostile_run(tmp_path, images):
    """Class names, ids, metadata and error messages that try to inject markup; real pictures."""
    classes = ["nv", XSS[0], XSS[1]]
    files = sorted((images / "HAM10000_images_part_1").glob("*.jpg"))
    masks = images / "HAM10000_segmentations_lesion_tschandl"
    rows = []
    for i, path in enumerate(files):
        label = i % 3
        row = score_row(
            f"{XSS[i % 2]}{i}",
            label,
            classes,
            energy=0.1 if label == 1 else 0.8,
            agreement=0.1 if label == 2 else 0.9,
            path=str(path),
            sex=XSS[1] if i % 2 else "female",
            malignant=label == 1,
        )
        if i % 4 == 0:
            row.update(mask_source="provided", mask_path=str(masks / f"{path.stem}_segmentation.png"))
        rows.append(row)
    rows += [score_row(f"more{i}", 1, classes, energy=0.1, path=str(files[0]), malignant=True) for i in range(12)]
    rows += [score_row(f"also{i}", 2, classes, agreement=0.1, path=str(files[1]), malignant=False) for i in range(12)]
    rows.append(error_row(XSS[0], classes[1], "decode", f"cannot decode {XSS[1]}", label=1))
    metadata = {"sex": pa.string(), "malignant": pa.bool_()}
    return write_run(tmp_path / "run", rows, classes, metadata=metadata)


def test_every_string_from_the_data_is_escaped(hostile_run):
    build_report(hostile_run)
    html = (hostile_run / "report.html").read_text()
    parser = _Tags()
    parser.feed(html)
    assert [t for t, _ in parser.tags].count("script") == 1  # ours, nothing injected
    for tag, attrs in parser.tags:
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        if tag == "img":
            assert attrs["src"].startswith(("data:image/jpeg;base64,", "data:image/png;base64,")), attrs
    assert "alert(1)" not in "".join(parser.script_text)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<script>alert(1)" not in html and "<img src=x" not in html


def test_report_is_self_contained_and_pictures_are_sized_jpegs(hostile_run):
    build_report(hostile_run)
    html = (hostile_run / "report.html").read_text()
    assert not re.search(r"(src|href)=\"(https?:|//)", html)
    assert "@import" not in html and "url(" not in html
    parser = _Tags()
    parser.feed(html)
    images = [attrs for tag, attrs in parser.tags if tag == "img"]
    jpegs = [a for a in images if a["src"].startswith("data:image/jpeg")]
    assert jpegs and len(images) > len(jpegs)  # thumbnails and plots
    for attrs in images:
        decoded = Image.open(io.BytesIO(base64.b64decode(attrs["src"].split(",", 1)[1])))
        assert decoded.size == (int(attrs["width"]), int(attrs["height"]))
    assert max(max(Image.open(io.BytesIO(base64.b64decode(a["src"].split(",", 1)[1]))).size) for a in jpegs) == 200


def test_report_sections_in_order(hostile_run):
    build_report(hostile_run)
    html = (hostile_run / "report.html").read_text()
    order = ['id="summary"', 'id="classes"', 'id="class-pred-', 'id="malignant"', 'id="errors"', 'id="facts"']
    positions = [html.index(marker) for marker in order]
    assert positions == sorted(positions)
    assert "cannot decode &#34;&gt;&lt;img" in html  # the error's reason is listed
    assert "Worst cases" in html and "Off-object and low-agreement rates by metadata" in html


def test_gallery_is_capped_and_shows_the_worst(hostile_run):
    build_report(hostile_run, gallery=2)
    html = (hostile_run / "report.html").read_text()
    sections = re.split(r'<section class="class ', html)[1:]
    for section in sections:
        assert section.count('class="card"') <= 2
    flagged = next(s for s in sections if s.startswith("fail"))
    assert flagged.count('class="card"') == 2 and "energy in mask 0.10" in flagged


def test_class_mean_maps_average_the_rows(tmp_path):
    rows = _class(0, 3)
    for value, row in zip((0.0, 0.5, 1.0), rows):
        row["map_cam"] = [value] * (MAP_SHAPE[0] * MAP_SHAPE[1])
    rows[2]["map_gradcam"] = None  # a method without a map is left out of its mean
    means = class_mean_maps(write_run(tmp_path / "run", rows, CLASSES))
    assert np.allclose(means[(0, "pred")]["cam"], 0.5)
    assert means[(0, "pred")]["cam"].shape == MAP_SHAPE
    expected = np.mean([np.asarray(r["map_gradcam"], dtype=np.float32) for r in rows[:2]], axis=0)
    assert np.allclose(means[(0, "pred")]["gradcam"].ravel(), expected, atol=1e-3)


def test_proportional_note_is_stated(tmp_path):
    run = write_run(tmp_path / "run", _class(0, 12), CLASSES, proportional=True)
    result = build_report(run)
    assert result.summary["counted_pairs"] == ["cam_gradcampp", "gradcam_gradcampp"]
    assert any("proportional by construction" in note for note in result.summary["notes"])
    assert "proportional: not evidence" in (run / "report.html").read_text()


# --- report.html in a real browser --------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium driven by Playwright. CI sets CAM_AUDIT_REQUIRE_BROWSER=1 so that a
    missing browser fails there instead of skipping."""
    import os
    from pathlib import Path

    required = os.environ.get("CAM_AUDIT_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            raise
        pytest.skip("playwright is not installed")
    if not Path(CHROMIUM).exists():
        if required:
            pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def _open(browser, path, **context_options):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, **context_options)
    page = context.new_page()
    events = {"console": [], "requests": [], "dialogs": [], "errors": []}
    page.on(
        "console", lambda m: events["console"].append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None
    )
    page.on("pageerror", lambda e: events["errors"].append(str(e)))
    page.on("dialog", lambda d: (events["dialogs"].append(d.message), d.dismiss()))
    url = path.as_uri()

    def route(route):
        if route.request.url == url:
            route.continue_()
        else:
            events["requests"].append(route.request.url)
            route.abort()

    context.route("**/*", route)
    page.goto(url, wait_until="load")
    return page, events


def _column(page, header: str) -> list[str]:
    index = page.evaluate(
        "h => Array.from(document.querySelectorAll('#class-table thead th'))"
        ".findIndex(t => t.textContent.trim() === h)",
        header,
    )
    return page.evaluate(
        "i => Array.from(document.querySelectorAll('#class-table tbody tr'))"
        ".filter(r => !r.hidden).map(r => r.cells[i].textContent.trim())",
        index,
    )


def test_report_in_headless_chromium(browser, hostile_run, tmp_path):
    build_report(hostile_run)
    page, events = _open(browser, hostile_run / "report.html")
    assert events["console"] == [] and events["errors"] == []
    assert events["requests"] == []  # nothing but the file itself
    assert events["dialogs"] == []  # no injected script ran

    decoded = page.evaluate(
        "Promise.all(Array.from(document.images)"
        ".map(i => i.decode().then(() => [i.naturalWidth, i.width], () => [0, 0])))"
    )
    assert len(decoded) > 10 and all(natural > 0 and shown > 0 for natural, shown in decoded)
    gallery = page.evaluate("document.querySelectorAll('.card img').length")
    assert gallery >= 4

    page.click("#class-table thead th >> text=Images")
    images = [int(v) for v in _column(page, "Images")]
    assert images == sorted(images)
    page.click("#class-table thead th >> text=Images")
    assert [int(v) for v in _column(page, "Images")] == sorted(images, reverse=True)
    page.click("#class-table thead th >> text=Status")
    page.click("#class-table thead th >> text=Status")  # descending: fail first
    assert _column(page, "Status")[0].endswith("FAIL")

    page.fill("#class-filter", "nv")
    assert _column(page, "Class") == ["nv"]
    page.fill("#class-filter", "")
    assert len(_column(page, "Class")) == 3
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)


def test_report_reads_with_javascript_off(browser, hostile_run):
    build_report(hostile_run)
    page, events = _open(browser, hostile_run / "report.html", java_script_enabled=False)
    assert events["requests"] == []
    assert page.is_hidden("#filter-box")
    assert len(_column(page, "Class")) == 3
    assert page.locator(".card").count() >= 2
