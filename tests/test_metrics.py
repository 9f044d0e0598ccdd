"""Per-row scores on hand-made maps and masks with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import rankdata, spearmanr

from audit.explain.metrics import (
    MetricSettings,
    agreement,
    average_ranks,
    localization,
    score_batch,
    spearman,
    top_region,
)

NOT_EMPTY = torch.zeros(1, dtype=torch.bool)


def _one(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)[None]


def _flags(*names, empty=False):
    return {name: torch.full((1,), empty) for name in names}


def test_average_ranks_match_scipy_with_ties():
    x = torch.tensor([[3.0, 1.0, 1.0, 0.0, 0.0, 0.0, 2.0, 5.0]])
    assert average_ranks(x)[0].tolist() == rankdata(x[0].numpy()).tolist()


def test_spearman_matches_scipy_on_tied_maps():
    rng = np.random.default_rng(0)
    a = np.maximum(rng.normal(size=(4, 100)), 0)  # ReLU'd maps: many tied zeros
    b = np.maximum(a + rng.normal(scale=0.5, size=a.shape), 0)
    rho, defined = spearman(torch.from_numpy(a), torch.from_numpy(b))
    assert defined.all()
    expected = [spearmanr(a[i], b[i]).statistic for i in range(4)]
    assert np.allclose(rho.numpy(), expected, atol=1e-6)


def test_identical_maps_agree_perfectly_and_reversed_ranks_give_minus_one():
    base = torch.arange(49, dtype=torch.float32).reshape(1, 7, 7) / 48
    maps = {"cam": base, "gradcam": base.clone(), "gradcampp": 1 - base}
    scores = agreement(maps, _flags("cam", "gradcam", "gradcampp"), MetricSettings(grid=7)).columns()
    assert scores["agree_spearman_cam_gradcam"] == [pytest.approx(1.0)]
    assert scores["agree_topk_iou_cam_gradcam"] == [pytest.approx(1.0)]
    assert scores["agree_spearman_cam_gradcampp"] == [pytest.approx(-1.0, abs=1e-6)]
    assert scores["agree_topk_iou_cam_gradcampp"] == [pytest.approx(0.0)]


def test_reversed_ranks_give_minus_one_after_upsampling():
    base = torch.rand(2, 5, 5)
    rho, _ = spearman(base.flatten(1), -base.flatten(1))
    assert torch.allclose(rho, torch.full((2,), -1.0))


def test_agreement_with_an_empty_map_is_null():
    base = torch.rand(1, 7, 7)
    maps = {"gradcam": base, "gradcampp": torch.zeros(1, 7, 7)}
    empty = {"gradcam": NOT_EMPTY, "gradcampp": torch.ones(1, dtype=torch.bool)}
    scores = agreement(maps, empty, MetricSettings()).columns()
    assert scores == {"agree_spearman_gradcam_gradcampp": [None], "agree_topk_iou_gradcam_gradcampp": [None]}


def test_without_cam_only_the_gradient_pair_is_scored():
    scores = score_batch(
        {"cam": None, "gradcam": torch.rand(2, 7, 7), "gradcampp": torch.rand(2, 7, 7)},
        {"cam": None, **{m: torch.zeros(2, dtype=torch.bool) for m in ("gradcam", "gradcampp")}},
    )
    assert set(scores.columns()) == {"agree_spearman_gradcam_gradcampp", "agree_topk_iou_gradcam_gradcampp"}


def test_top_region_keeps_k_percent_and_only_positive_pixels():
    values = torch.arange(10, dtype=torch.float32)[None]
    assert top_region(values, 0.2)[0].tolist() == [False] * 8 + [True] * 2
    sparse = torch.tensor([[0.0] * 9 + [1.0]])
    assert top_region(sparse, 0.5)[0].sum() == 1  # the tied zeros are not "top"


def _square_mask(size=8, lo=2, hi=6):
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[:, lo:hi, lo:hi] = True
    return mask


def _locate(map_, mask, **kwargs):
    maps = {"gradcam": map_}
    return localization(maps, _flags("gradcam"), mask, MetricSettings(**kwargs)).columns()


def test_map_fully_inside_the_mask():
    mask = _square_mask()
    scores = _locate(mask.float(), mask)
    assert scores["energy_in_mask_gradcam"] == [pytest.approx(1.0)]
    assert scores["pointing_hit_gradcam"] == [True]
    assert scores["iou_gradcam"] == [pytest.approx(1.0)]
    assert scores["energy_in_mask_consensus"] == [pytest.approx(1.0)]


def test_map_disjoint_from_the_mask():
    mask = _square_mask()
    scores = _locate((~mask).float(), mask)
    assert scores["energy_in_mask_gradcam"] == [pytest.approx(0.0)]
    assert scores["pointing_hit_gradcam"] == [False]
    assert scores["iou_gradcam"] == [pytest.approx(0.0)]


def test_known_partial_values():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[:, :, :2] = True  # left half is the object
    map_ = torch.zeros(1, 4, 4)
    map_[:, 0, 0] = 1.0  # peak on the object
    map_[:, 0, 3] = 0.6
    map_[:, 3, 3] = 0.2
    scores = _locate(map_, mask)
    assert scores["energy_in_mask_gradcam"] == [pytest.approx(1.0 / 1.8)]
    assert scores["pointing_hit_gradcam"] == [True]
    assert scores["iou_gradcam"] == [pytest.approx(1 / 9)]  # {(0,0),(0,3)} vs 8 object pixels
    assert scores["mask_area"] == [pytest.approx(0.5)]  # what a map spread evenly would score


def test_maps_are_upsampled_to_the_mask_resolution():
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[:, :, :32] = True
    map_ = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    scores = _locate(map_, mask)
    assert 0.75 < scores["energy_in_mask_gradcam"][0] < 1.0  # bilinear spill across the border
    assert scores["pointing_hit_gradcam"] == [True]


def test_empty_mask_and_empty_map_give_null_not_nan():
    scores = _locate(torch.rand(1, 8, 8), torch.zeros(1, 8, 8, dtype=torch.bool))
    assert all(value == [None] for value in scores.values())
    maps, empty = {"gradcam": torch.zeros(1, 8, 8)}, {"gradcam": torch.ones(1, dtype=torch.bool)}
    located = localization(maps, empty, _square_mask(), MetricSettings()).columns()
    assert located.pop("mask_area") == [pytest.approx(0.25)]  # the mask is real; only the map is empty
    assert all(value == [None] for value in located.values())


def test_loc_delta_known_values():
    box = torch.tensor([[0.0, 0.0, 0.5, 0.5]])  # the top-left quarter
    settings = MetricSettings(grid=8)
    inside = torch.zeros(1, 8, 8)
    inside[:, :4, :4] = 1.0
    everywhere = torch.ones(1, 8, 8)
    below_delta = torch.full((1, 8, 8), 0.4)
    below_delta[:, 0, 0] = 1.0  # keep one pixel so the map is not empty
    for map_, expected in ((inside, 1.0), (everywhere, 16 / 64), (below_delta, 1 / 16)):
        scores = localization({"gradcam": map_}, _flags("gradcam"), None, settings, boxes=box).columns()
        assert scores["loc_gradcam"] == [pytest.approx(expected)]


def test_rows_without_a_box_are_null():
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [float("nan")] * 4])
    maps, empty = {"gradcam": torch.rand(2, 4, 4)}, {"gradcam": torch.zeros(2, dtype=torch.bool)}
    scores = localization(maps, empty, None, MetricSettings(grid=8), boxes=boxes).columns()
    assert scores["loc_gradcam"][0] is not None and scores["loc_gradcam"][1] is None


def test_consensus_is_the_mean_of_the_maps():
    mask = _square_mask()
    left, right = torch.zeros(1, 8, 8), torch.zeros(1, 8, 8)
    left[:, 3, 3], right[:, 3, 4] = 1.0, 1.0
    maps = {"cam": left, "gradcam": right, "gradcampp": left}
    scores = localization(maps, _flags("cam", "gradcam", "gradcampp"), mask, MetricSettings()).columns()
    assert scores["energy_in_mask_consensus"] == [pytest.approx(1.0)]
    assert scores["iou_consensus"] == [pytest.approx(2 / 16)]  # 2/3 and 1/3 (renormalised: 1 and 0.5)


@pytest.mark.parametrize("kwargs", [{"grid": 1}, {"topk": 0}, {"topk": 1.5}, {"delta": 0}])
def test_settings_are_validated(kwargs):
    with pytest.raises(ValueError):
        MetricSettings(**kwargs)


def test_scores_are_batched_and_device_local():
    maps = {m: torch.rand(5, 7, 7) for m in ("cam", "gradcam", "gradcampp")}
    empty = {m: torch.zeros(5, dtype=torch.bool) for m in maps}
    masks = torch.rand(5, 32, 32) > 0.5
    scores = score_batch(maps, empty, masks)
    assert len(scores.values) == 6 + 4 * 3 + 1  # agreement, localization, mask_area
    assert all(v.shape == (5,) and v.device == maps["cam"].device for v in scores.values.values())
