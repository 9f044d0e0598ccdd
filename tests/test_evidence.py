"""Evidence by intervention: the counterfactual images, the faithfulness measures against
pytorch-grad-cam, and the flags they raise on models whose truth is known by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audit.explain.engine import ExplainEngine
from audit.explain.evidence import (
    counterfactuals,
    dilate,
    dilation_radius,
    distinct_maps,
    evidence_kinds,
    faithfulness,
    gather_evidence,
    skin_fill,
)
from audit.report import build_report
from audit.report.flags import assess
from audit.report.load import load_run
from audit.report.thresholds import Thresholds
from tests.conftest import random_images, random_model
from tests.evidence_models import CLASSES, FALLBACK, SKIN, ColourDetectorNet, audited_rows, make_images
from tests.report_runs import score_row, write_run


def test_hiding_the_object_fills_it_with_the_skin_colour_and_leaves_the_rest():
    images, masks = make_images([1, 0], [False, True])
    radius = dilation_radius((32, 32))
    made = counterfactuals(images, masks, radius)
    fill = torch.tensor(SKIN).view(1, 3, 1)
    hidden = made.object_hidden.flatten(2)
    assert torch.allclose(hidden[:, :, masks[0].flatten()], fill, atol=0.03)  # no lesion pixel survives
    far = ~dilate(masks, 2 * radius)[0].flatten()
    assert torch.equal(hidden[:, :, far], images.flatten(2)[:, :, far])  # the context is untouched...
    assert torch.equal(made.object_hidden[1, :, -7:-2, -7:-2], images[1, :, -7:-2, -7:-2])  # ...sticker included
    alone = made.object_alone.flatten(2)
    assert torch.equal(alone[:, :, masks[0].flatten()], images.flatten(2)[:, :, masks[0].flatten()])
    assert torch.allclose(made.object_alone[1, :, -7:-2, -7:-2], fill[..., None], atol=0.03)  # the sticker is gone


def test_the_fill_is_the_median_outside_the_dilated_object_and_has_no_hard_edge():
    images, masks = make_images([1], [True])
    background = ~dilate(masks, 3)
    expected = images[0][:, background[0]].median(dim=1).values
    assert torch.allclose(skin_fill(images, background)[0, :, 0, 0], expected)
    made = counterfactuals(images, masks, 4)
    rows = made.object_hidden[0, 0, 16]  # one image row through the lesion's centre
    assert rows.diff().abs().max() < 0.1  # the skin around and the fill meet without a step


def test_an_object_covering_everything_is_filled_with_the_whole_image_median():
    images = random_images(2, 16)
    masks = torch.ones(2, 16, 16, dtype=torch.bool)
    fill = skin_fill(images, ~dilate(masks, 2))
    assert torch.isfinite(fill).all()
    assert torch.allclose(fill[:, :, 0, 0], images.flatten(2).nanmedian(dim=2).values)


def test_dilation_grows_by_the_radius():
    mask = torch.zeros(1, 21, 21, dtype=torch.bool)
    mask[0, 10, 10] = True
    assert dilate(mask, 3).sum() == 49 and dilate(mask, 0).sum() == 1
    assert dilation_radius((224, 224)) == 9 and dilation_radius((32, 32)) == 2


def test_evidence_kinds():
    assert evidence_kinds("all") == ("occlusion", "faithfulness") and evidence_kinds("none") == ()
    assert evidence_kinds("faithfulness") == ("faithfulness",)
    with pytest.raises(ValueError, match="evidence must be one of"):
        evidence_kinds("everything")


def test_maps_equal_by_construction_share_one_forward():
    a = torch.rand(2, 4, 4)
    kept, same = distinct_maps({"cam": a, "gradcam": a + 1e-7, "gradcampp": a.flip(-1), "consensus": a})
    assert list(kept) == ["cam", "gradcampp"]
    assert same == {"cam": "cam", "gradcam": "cam", "gradcampp": "gradcampp", "consensus": "cam"}


def test_drop_and_increase_follow_the_papers_formulas():
    drop, increase = faithfulness(torch.tensor([0.8, 0.5, 0.2]), torch.tensor([0.2, 0.5, 0.6]))
    assert torch.allclose(drop, torch.tensor([0.75, 0.0, 0.0])) and increase.tolist() == [False, False, True]


@pytest.mark.parametrize("targets", ["pred", "other"])
def test_faithfulness_equals_pytorch_grad_cams_confidence_change(targets):
    """Same model, images, maps and targets: our drop * Y is pytorch-grad-cam's DropInConfidence,
    and our increase its IncreaseInConfidence, to 1e-5."""
    from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence, IncreaseInConfidence
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    from audit.explain.metrics import consensus, upsample

    model = random_model("resnet18", num_classes=5)
    images = random_images(6, 64)
    engine = ExplainEngine(model, (64, 64))
    chosen = None if targets == "pred" else torch.tensor([0, 1, 2, 3, 4, 0])
    explanation = engine(images, chosen)
    columns = gather_evidence(engine, images, [explanation], ("faithfulness",))[0].columns()
    maps = {m: v for m, v in explanation.maps.items() if v is not None}
    maps["consensus"], _ = consensus(maps)
    wanted = [ClassifierOutputSoftmaxTarget(int(t)) for t in explanation.targets]
    original = explanation.probs.gather(1, explanation.targets[:, None])[:, 0].numpy()
    for method, saliency in maps.items():
        cams = upsample(saliency, (64, 64)).numpy()
        peer_drop = DropInConfidence()(images, cams, wanted, model)
        peer_increase = IncreaseInConfidence()(images, cams, wanted, model)
        assert np.allclose(np.asarray(columns[f"drop_{method}"]) * original, peer_drop, atol=1e-5), method
        assert columns[f"increase_{method}"] == [bool(v) for v in peer_increase], method


def test_rows_without_a_mask_get_no_occlusion_evidence():
    images, masks = make_images([1, 2], [False, False])
    engine = ExplainEngine(ColourDetectorNet(), (32, 32))
    explanation = engine(images)
    has_mask = torch.tensor([True, False])
    columns = gather_evidence(engine, images, [explanation], ("occlusion",), masks, has_mask)[0].columns()
    assert columns["object_hidden_pred"] == [FALLBACK, None] and columns["object_alone_pred"] == [1, None]
    assert not any(name.startswith("drop_") for name in columns)
    assert gather_evidence(engine, images, [explanation], ("occlusion",), None)[0].columns() == {}


def _results(tmp_path, rows):
    run_dir = write_run(tmp_path / "run", rows, CLASSES, proportional=True, input_size=(32, 32), map_shape=(32, 32))
    return {r.label_name: r for r in assess(load_run(run_dir), Thresholds())}, run_dir


def test_a_model_that_answers_from_a_corner_sticker_is_context_reliant_and_only_it(tmp_path):
    results, _ = _results(tmp_path, audited_rows(shortcut=True))
    sticker = results["sticker"].stats.reliance["object_hidden"]
    assert sticker.kept.value == 1.0 and sticker.base.value == 0.0 and sticker.excess == 1.0
    assert [(f.kind, f.status) for f in results["sticker"].flags if f.kind == "context_reliance"] == [
        ("context_reliance", "fail")
    ]
    fallback = results["fallback"].stats.reliance["object_hidden"]
    assert fallback.kept.value == 1.0 and fallback.base.value == 1.0 and fallback.excess == 0.0  # a fallback
    for name in ("fallback", "brown", "blue"):
        assert results[name].status == "pass", (name, results[name].flags)
    for name in ("brown", "blue"):
        assert results[name].stats.reliance["object_hidden"].kept.value == 0.0
        assert results[name].stats.reliance["object_alone"].kept.value == 1.0  # the lesion is enough
    assert results["sticker"].stats.reliance["object_alone"].kept.value == 0.0  # its lesion is not
    verdict, sentence = results["sticker"].intervention()
    assert "off_object" in {f.kind for f in results["sticker"].flags}  # its maps point at the sticker too
    assert verdict == "confirmed" and sentence.startswith("confirmed by intervention: 100% of its correct images")


def test_a_clean_model_falling_back_on_one_class_flags_nothing(tmp_path):
    results, _ = _results(tmp_path, audited_rows(shortcut=False))
    fallback = results["fallback"].stats.reliance["object_hidden"]
    assert fallback.kept.value == 1.0 and fallback.excess <= 0.0  # every object-less image lands there
    assert all(r.status == "pass" and r.intervention() is None for r in results.values())


def test_off_object_without_context_reliance_is_not_confirmed(tmp_path):
    results, _ = _results(tmp_path, audited_rows(shortcut=False, off_object={2: 0.05}))
    brown = results["brown"]
    assert {f.kind for f in brown.flags} == {"off_object"}
    verdict, sentence = brown.intervention()
    assert verdict == "not_confirmed" and "only 0% of its correct images keep the class" in sentence


def test_summary_and_report_show_the_evidence(tmp_path):
    _, run_dir = _results(tmp_path, audited_rows(shortcut=True))
    result = build_report(run_dir)
    entry = next(c for c in result.summary["classes"] if c["label_name"] == "sticker")
    assert entry["context_reliance"]["excess"]["value"] == 1.0 and entry["intervention"]["verdict"] == "confirmed"
    assert entry["object_sufficiency"]["kept"]["value"] == 0.0
    assert set(entry["faithfulness"]["average_drop"]) == {"cam", "gradcam", "gradcampp", "consensus"}
    assert result.summary["faithfulness"]["most_faithful"] in ("cam", "gradcam", "gradcampp")
    assert any(
        "context reliance (occlusion): 100% of correct images beyond the base rate" in line
        for line in result.headline()
    )
    html = result.html_path.read_text()
    assert 'id="intervention-verdicts"' in html and "confirmed by intervention" in html
    assert 'id="faithfulness"' in html and "object hidden (context reliance)" in html


def test_a_run_without_evidence_reports_as_before(tmp_path):
    rows = [score_row(f"{CLASSES[label]}{i}", label, CLASSES) for label in range(4) for i in range(12)]
    result = build_report(write_run(tmp_path / "old", rows, CLASSES))
    entry = result.summary["classes"][0]
    assert "context_reliance" not in entry and "faithfulness" not in entry and "faithfulness" not in result.summary
    assert result.status == "pass"
