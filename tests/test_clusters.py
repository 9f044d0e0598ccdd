"""Strategy clusters (SpRAy-style): the part of a class that looks somewhere else, found from the
stored maps, named by its region and flagged; deterministic; one cluster for one strategy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from audit.report import build_report
from audit.report.clusters import GRID, OTHER, cluster_maps, enriched_metadata, number_by_size, region_name
from audit.report.compare import compare_runs
from audit.report.flags import assess
from audit.report.load import load_run
from audit.report.thresholds import Thresholds
from tests.evidence_models import CLASSES, SIZE, audited_rows
from tests.report_runs import write_run


def _blob(cy: float, cx: float, spread: float, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:GRID, 0:GRID]
    hot = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * spread**2)) + 0.15 * rng.random((GRID, GRID))
    return ((hot - hot.min()) / (hot.max() - hot.min())).ravel()


def _maps(n: int, corner_share: float, seed: int = 0) -> np.ndarray:
    """Noisy maps on the centre, the first ``corner_share`` of them on the bottom-right corner."""
    rng = np.random.default_rng(seed)
    return np.array(
        [
            _blob(13 + rng.normal(0, 0.7), 13 + rng.normal(0, 0.7), 2, rng)
            if i < corner_share * n
            else _blob(7.5 + rng.normal(0, 1.5), 7.5 + rng.normal(0, 1.5), 3 + 2 * rng.random(), rng)
            for i in range(n)
        ]
    )


@pytest.mark.parametrize("n", [30, 300, 1500])
def test_a_corner_sub_strategy_is_its_own_cluster(n):
    maps = _maps(n, 0.35)
    clustering = cluster_maps(maps)
    assert clustering.count == 2
    planted = int(np.ceil(0.35 * n))
    corner = clustering.labels[:planted]
    assert len(set(corner)) == 1 and (clustering.labels[planted:] != corner[0]).all()
    mean = maps[clustering.labels == corner[0]].mean(axis=0).reshape(GRID, GRID)
    assert region_name(mean) == "bottom-right corner"


@pytest.mark.parametrize("n", [40, 100, 300])
def test_one_strategy_with_noise_stays_one_cluster(n):
    assert cluster_maps(_maps(n, 0.0)).count == 1


def test_identical_maps_are_one_cluster_and_clustering_is_deterministic():
    same = np.tile(_maps(1, 0.0), (40, 1))
    assert (cluster_maps(same).labels == 0).all()
    maps = _maps(200, 0.3, seed=3)
    first, second = cluster_maps(maps, seed=7), cluster_maps(maps, seed=7)
    assert np.array_equal(first.labels, second.labels) and np.array_equal(first.embedding, second.embedding)


def test_clusters_are_numbered_by_size_and_small_ones_fold_into_other():
    labels = np.array([2] * 4 + [0] * 7 + [1] * 12 + [3] * 5)
    assert number_by_size(labels, floor=5).tolist() == [OTHER] * 4 + [1] * 7 + [0] * 12 + [2] * 5


@pytest.mark.parametrize(
    ("where", "name"),
    [
        ((slice(13, 16), slice(None)), "bottom edge"),
        ((slice(None), slice(0, 3)), "left edge"),
        ((slice(0, 4), slice(12, 16)), "top-right corner"),
        ((slice(6, 10), slice(6, 10)), "centre"),
        ((slice(0, 4), slice(6, 10)), "top edge"),
        ((slice(None), slice(None)), "spread over the image"),
    ],
)
def test_regions_are_named_from_where_the_mean_map_is_hot(where, name):
    mean = np.zeros((GRID, GRID))
    mean[where] = 1.0
    assert region_name(mean) == name


def test_over_represented_metadata_is_found_and_uniform_metadata_is_not():
    inside = np.arange(60) < 20
    metadata = pd.DataFrame(
        {
            "localization": np.where(inside, "back", np.where(np.arange(60) % 2 == 0, "face", "back")),
            "sex": np.where(np.arange(60) % 2 == 0, "male", "female"),
        }
    )
    found = enriched_metadata(metadata, inside)
    assert [(f["column"], f["value"]) for f in found] == [("localization", "back")]
    assert found[0]["share_in_cluster"] == 1.0 and found[0]["p"] < 0.05


def _partial_run(tmp_path, name: str, sticker_share: float):
    rows = audited_rows(shortcut=True, per_class=36, sticker_share=sticker_share)
    return write_run(tmp_path / name, rows, CLASSES, proportional=True, input_size=(SIZE, SIZE), map_shape=(SIZE, SIZE))


def test_a_shortcut_on_a_third_of_a_class_is_a_flagged_cluster_while_the_class_rate_passes(tmp_path):
    """The sticker class answers from a corner sticker on a third of its images and from its own
    lesion on the rest: the class-level rates stay under their thresholds, the cluster does not."""
    results = {r.label_name: r for r in assess(load_run(_partial_run(tmp_path, "run", 1 / 3)), Thresholds())}
    sticker = results["sticker"]
    assert sticker.flags == []  # neither off-object nor context reliance at the class level
    assert sticker.stats.rates["off_object"]["consensus"].value == pytest.approx(1 / 3)
    clusters = {c.region: c for c in sticker.strategies.clusters}
    assert set(clusters) == {"centre", "bottom-right corner"}
    corner = clusters["bottom-right corner"]
    assert corner.n == 12 and corner.share == pytest.approx(1 / 3) and corner.off_object.value == 1.0
    assert corner.context.kept.value == 1.0 and corner.context.excess == 1.0
    assert {(f.kind, f.status, f.cluster) for f in sticker.cluster_flags} == {
        ("off_object", "fail", "bottom-right corner"),
        ("context_reliance", "fail", "bottom-right corner"),
    }
    assert sticker.status == "fail"  # the cluster's flags count towards the class
    for name in ("fallback", "brown", "blue"):
        assert results[name].cluster_flags == [] and results[name].status == "pass"
        assert [c.region for c in results[name].strategies.clusters] == ["centre"]


def test_summary_report_and_compare_show_the_clusters(tmp_path):
    run_dir = _partial_run(tmp_path, "run", 1 / 3)
    result = build_report(run_dir)
    entry = next(c for c in result.summary["classes"] if c["label_name"] == "sticker")
    assert result.summary["cluster_method"] == "consensus" and entry["status"] == "fail"
    corner = next(c for c in entry["clusters"] if c["region"] == "bottom-right corner")
    assert corner["cluster"] == 2 and corner["n"] == 12 and len(corner["examples"]) == 3
    assert {f["kind"] for f in corner["flags"]} == {"off_object", "context_reliance"}
    assert any("strategy cluster at the bottom-right corner: off-object" in line for line in result.headline())
    html = result.html_path.read_text()
    assert "Strategies: 2 clusters of the consensus maps" in html and "bottom-right corner" in html
    clean = _partial_run(tmp_path, "clean", 0.0)
    comparison = compare_runs(load_run(clean), load_run(run_dir), Thresholds())
    sticker = next(c for c in comparison.classes if c.label_name == "sticker")
    assert {(f.kind, f.cluster) for f in sticker.new_flags} >= {("off_object", "bottom-right corner")}
    assert any("of the cluster at the bottom-right corner" in line for line in sticker.flag_lines())
    back = compare_runs(load_run(run_dir), load_run(clean), Thresholds())
    resolved = next(c for c in back.classes if c.label_name == "sticker").resolved_flags
    assert ("context_reliance", "bottom-right corner") in {(f.kind, f.cluster) for f in resolved}


def test_another_method_can_be_clustered_and_metadata_is_reported(tmp_path):
    rows = audited_rows(shortcut=True, per_class=36, sticker_share=1 / 3)
    for row in rows:  # the sticker images were all photographed on the back
        row["localization"] = "back" if row["image_id"] in {f"sticker{i}" for i in range(12)} else "face"
    run_dir = write_run(
        tmp_path / "run",
        rows,
        CLASSES,
        proportional=True,
        input_size=(SIZE, SIZE),
        map_shape=(SIZE, SIZE),
        metadata={"localization": pa.string()},
    )
    results = {r.label_name: r for r in assess(load_run(run_dir), Thresholds(), cluster_method="gradcampp")}
    corner = next(c for c in results["sticker"].strategies.clusters if c.region == "bottom-right corner")
    assert results["sticker"].strategies.method == "gradcampp"
    assert [(m["column"], m["value"]) for m in corner.metadata] == [("localization", "back")]
