"""The model-randomization sanity check and the guided maps: models whose maps cannot depend on
the classifier fail, models whose maps follow it pass, guided maps match pytorch-grad-cam, and
the report reads the verdict (which flags stand, which classes are not confirmed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from pytorch_grad_cam import GradCAMPlusPlus as PgcGradCAMPlusPlus
from pytorch_grad_cam.guided_backprop import GuidedBackpropReLUModel
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from audit.explain.engine import ExplainEngine
from audit.explain.guided import GuidedBackprop, guided_maps, guided_note
from audit.explain.sanity import SANITY_FILE, SanityCheck, randomize, verdicts
from audit.models.anatomy import randomization_cascade
from audit.report import build_report
from audit.report.sanity import read_sanity, stands
from tests.oracles import relu_minmax
from tests.report_runs import class_rows, score_row, write_run

SIZE = (32, 32)


class RegionGate(nn.Module):
    """Channel k survives in region k of an 8x8 map only (two columns by four rows each)."""

    def __init__(self) -> None:
        super().__init__()
        regions = torch.zeros(8, 8, 8)
        for k in range(8):
            row, col = divmod(k, 4)
            regions[k, row * 4 : row * 4 + 4, col * 2 : col * 2 + 2] = 1
        self.register_buffer("regions", regions)

    def forward(self, a):
        return a * self.regions


class Quadrants(nn.Module):
    """Eight feature channels, each alive in one region of the map only, read by a GAP -> linear
    head: which regions a CAM map lights up is decided by the signs of the classifier's weights."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, stride=4),
            nn.Softplus(),  # dense within each region: no cell is zero in every map
            RegionGate(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


class SumHead(nn.Module):
    """logit_c = softplus(v_c) * sum(A) + b_c: the gradient is the same positive constant at every
    position and channel, so the Grad-CAM map is the activation sum whatever v is (Grad-CAM++'s
    channel weights, 1 / (2 / g + sum A_k), move a little with the constant g)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.randn(classes))
        self.b = nn.Parameter(torch.randn(classes))

    def forward(self, a):
        return nn.functional.softplus(self.v) * a.sum(dim=(1, 2, 3))[:, None] + self.b

    def reset_parameters(self) -> None:
        nn.init.normal_(self.v)
        nn.init.normal_(self.b)


class ActivationSum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=4), nn.ReLU())
        self.head = SumHead()

    def forward(self, x):
        return self.head(self.features(x))


def _images(n: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, *SIZE, generator=torch.Generator().manual_seed(seed))


def _seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters") and module is not model:
            module.reset_parameters()
    return model.eval()


# --- the cascade -----------------------------------------------------------------------------


def test_the_cascade_starts_at_the_classifier_and_walks_the_target_stage_down_one_beyond():
    resnet = torchvision.models.resnet18(num_classes=3)
    assert randomization_cascade(resnet, (64, 64), "layer4") == [
        ["fc"],
        ["fc", "layer4.1"],
        ["fc", "layer4.1", "layer4.0"],
        ["fc", "layer4.1", "layer4.0", "layer3"],
    ]
    densenet = torchvision.models.densenet121(num_classes=3)
    steps = randomization_cascade(densenet, (64, 64), "features")
    assert [step[-1] for step in steps] == [
        "classifier",
        "features.norm5",
        "features.denseblock4",
        "features.transition3",
        "features.denseblock3",
    ]
    assert all(earlier == later[: len(earlier)] for earlier, later in zip(steps, steps[1:]))


def test_randomize_is_reproducible_and_replaces_every_parameter():
    a, b = torchvision.models.resnet18(num_classes=3), torchvision.models.resnet18(num_classes=3)
    b.load_state_dict(a.state_dict())
    before = {k: v.clone() for k, v in a.state_dict().items()}
    randomize(a.layer4, seed=7)
    randomize(b.layer4, seed=7)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])
        if key.startswith("layer4.") and key.endswith(("conv1.weight", "conv2.weight")):
            assert not torch.equal(value, before[key])
        if not key.startswith("layer4."):
            assert torch.equal(value, before[key])
    assert torch.equal(a.layer4[0].bn1.running_mean, torch.zeros(512))


# --- the check on models whose truth is known --------------------------------------------------


def test_maps_that_cannot_depend_on_the_classifier_fail():
    model = _seeded(ActivationSum())
    result = SanityCheck(ExplainEngine(model, SIZE, target_layer="features"))(_images())
    first = result.steps[0].similarity
    assert result.steps[0].randomized == ["head"]
    assert first["gradcam"] == pytest.approx(1.0)
    assert first["gradcampp"] > 0.9  # its channel weights depend on the gradient's scale, a little
    assert first["cam"] is None and "cam" in result.notes  # no linear head: no CAM, and the reason
    verdict = verdicts([{"similarity": s.similarity} for s in result.steps], threshold=0.5)
    assert verdict == {"gradcam": "fail", "gradcampp": "fail", "consensus": "fail"} | {
        k: v for k, v in verdict.items() if k.startswith("guided")
    }


def test_maps_that_follow_the_classifier_pass():
    model = _seeded(Quadrants())
    result = SanityCheck(ExplainEngine(model, SIZE))(_images())
    first = result.steps[0].similarity
    assert result.seeds == [0, 1, 2] and result.images == 24 and result.guided_images == 8
    verdict = verdicts([{"similarity": first}], threshold=0.5)
    assert verdict["cam"] == verdict["gradcam"] == "pass", first
    assert first["cam"] < 0.5 and first["gradcam"] < 0.5


def test_the_check_leaves_the_trained_model_alone():
    model = _seeded(Quadrants())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    SanityCheck(ExplainEngine(model, SIZE), seeds=(0,))(_images(6))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert isinstance(model.features[1], nn.ReLU)  # the guided copy's ReLUs stay in the copy


def test_the_check_is_deterministic():
    model = _seeded(Quadrants())
    images = _images(8)
    first = SanityCheck(ExplainEngine(model, SIZE), seeds=(0, 1))(images)
    second = SanityCheck(ExplainEngine(model, SIZE), seeds=(0, 1))(images)
    assert [s.similarity for s in first.steps] == [s.similarity for s in second.steps]


# --- guided maps ---------------------------------------------------------------------------------


def test_guided_gradcampp_equals_pytorch_grad_cams_guided_backprop_times_its_gradcampp():
    model = _seeded(torchvision.models.resnet18(num_classes=5), seed=3)
    images = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))  # 3x3 maps at layer4
    engine = ExplainEngine(model, (96, 96), gradcampp_eps=1e-6)
    explained = engine(images)
    gradients = GuidedBackprop(model)(images, explained.targets)
    ours = guided_maps(gradients, explained.maps)["guided-gradcampp"]
    peer_cam = PgcGradCAMPlusPlus(model=model, target_layers=[model.layer4])
    for i in range(images.shape[0]):
        target = int(explained.targets[i])
        gb = GuidedBackpropReLUModel(model=model, device="cpu")(images[i : i + 1], target_category=target)
        np.testing.assert_allclose(gradients[i].permute(1, 2, 0).numpy(), gb, rtol=1e-5, atol=1e-9)
        cam = relu_minmax(peer_cam(images[i : i + 1], targets=[ClassifierOutputTarget(target)]))[0]  # see oracles
        expected = gb * cam[..., None]
        # the maps agree to 0.003 after OpenCV's and torch's bilinear upsampling, so the products to 0.3%
        np.testing.assert_allclose(ours[i].numpy(), expected, atol=3e-3 * np.abs(gb).max())


def test_guided_backprop_passes_only_positive_gradients_through_relus():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    x = torch.randn(4, 3, 2, 2)
    guided = GuidedBackprop(model)(x, torch.zeros(4, dtype=torch.long))
    hidden = model[1](model[0](x))
    upstream = model[3].weight[0]  # d logit_0 / d relu output
    gate = (hidden > 0) & (upstream > 0)
    expected = (gate * upstream) @ model[1].weight
    torch.testing.assert_close(guided.flatten(1), expected, rtol=1e-5, atol=1e-6)


def test_models_without_relus_get_no_guided_maps_and_say_why():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    assert "nn.ReLU" in guided_note(model)
    with pytest.raises(ValueError, match="ReLU"):
        GuidedBackprop(model)
    result = SanityCheck(ExplainEngine(model, SIZE, target_layer="0"), seeds=(0,))(_images(4))
    assert result.guided_images == 0 and "guided-gradcampp" in result.notes
    assert result.steps[0].similarity["guided-gradcampp"] is None


# --- the report's reading ----------------------------------------------------------------------

CLASSES = ["akiec", "bcc", "df", "mel"]


def test_which_flags_stand():
    failing = frozenset({"gradcampp"})
    assert stands("cam", failing) and stands("occlusion", failing) and stands("cam_gradcam", failing)
    assert not stands("gradcampp", failing) and not stands("gradcam_gradcampp", failing)
    assert not stands("all", failing)
    assert stands("consensus", failing) and not stands("consensus", failing | {"consensus"})
    assert stands("gradcampp", frozenset())


def _sanity_file(run_dir, gradcampp: float = 0.97, cam: float = 0.02, consensus: float = 0.3) -> None:
    first = {"cam": cam, "gradcam": cam, "gradcampp": gradcampp, "consensus": consensus}
    steps = [
        {"randomized": ["fc"], "similarity": first},
        {"randomized": ["fc", "layer4.1"], "similarity": {"cam": 0.0, "gradcam": 0.0, "gradcampp": 0.9}},
    ]
    data = {"images": 64, "seeds": [0, 1, 2], "steps": steps, "guided_images": 8, "notes": {}, "seconds": 3.2}
    (run_dir / SANITY_FILE).write_text(json.dumps(data))


@pytest.fixture
def gradcampp_only_run(tmp_path):
    """df is off-object for Grad-CAM++ only; mel for every method."""
    rows = class_rows(0, 30, CLASSES) + class_rows(1, 30, CLASSES)
    rows += [
        score_row(f"df{i}", 2, CLASSES, energy_in_mask_gradcampp=0.1 if i < 25 else 0.8, iou_gradcampp=0.1)
        for i in range(30)
    ]
    rows += class_rows(3, 30, CLASSES, off=25)
    run_dir = write_run(tmp_path / "20261201-100000-5a11e7c0", rows, CLASSES)
    _sanity_file(run_dir)
    return run_dir


def test_a_class_flagged_only_by_a_failing_method_is_not_confirmed(gradcampp_only_run):
    result = build_report(gradcampp_only_run)
    by_name = {r.label_name: r for r in result.results}
    df, mel = by_name["df"], by_name["mel"]
    assert [f.method for f in df.flags] == ["gradcampp"] and not df.flags[0].stands
    assert df.status == "pass" and df.not_confirmed
    assert mel.status == "fail" and not mel.not_confirmed
    assert {f.method for f in mel.flags if not f.stands} == {"gradcampp"}
    summary = result.summary
    assert summary["sanity"]["verdict"] == {"cam": "pass", "gradcam": "pass", "gradcampp": "fail", "consensus": "pass"}
    assert summary["sanity"]["steps"][0]["randomized"] == ["fc"]
    df_entry = next(c for c in summary["classes"] if c["label_name"] == "df")
    assert df_entry["status"] == "pass" and df_entry["flags"][0]["stands"] is False
    lines = result.headline()
    assert any(line.startswith("  sanity check:") and "Grad-CAM++ FAIL (0.97)" in line for line in lines)
    assert any("df (pred)" in line and "not confirmed" in line for line in lines)
    html = result.html_path.read_text()
    assert 'id="sanity"' in html and 'id="not-confirmed"' in html and 'id="sanity-verdict"' in html
    assert "Grad-CAM++ <strong>FAILS</strong>" in html


def test_the_sanity_threshold_is_a_report_option(gradcampp_only_run):
    result = build_report(gradcampp_only_run, overrides={"sanity_similarity_max": 0.99})
    df = next(r for r in result.results if r.label_name == "df")
    assert df.status == "fail" and df.flags[0].stands
    assert result.summary["sanity"]["verdict"]["gradcampp"] == "pass"


def test_a_run_without_a_check_judges_every_method(gradcampp_only_run):
    (gradcampp_only_run / SANITY_FILE).unlink()
    result = build_report(gradcampp_only_run)
    assert "sanity" not in result.summary
    assert next(r for r in result.results if r.label_name == "df").status == "fail"


def test_a_broken_or_failed_check_is_reported_not_raised(gradcampp_only_run):
    (gradcampp_only_run / SANITY_FILE).write_text("{not json")
    view = read_sanity(gradcampp_only_run, 0.5)
    assert view.error and view.failing == frozenset()
    result = build_report(gradcampp_only_run)
    assert "error" in result.summary["sanity"]
    assert any("sanity check: did not run" in line for line in result.headline())


def test_strategy_clusters_move_to_a_passing_method_when_theirs_fails(gradcampp_only_run):
    _sanity_file(gradcampp_only_run, consensus=0.9)
    result = build_report(gradcampp_only_run)
    assert result.summary["cluster_method"] == "cam"
    assert "strategy clusters use CAM maps: consensus failed the sanity check" in result.summary["notes"]
    asked = build_report(gradcampp_only_run, cluster_method="consensus")  # asked for by name: kept
    assert asked.summary["cluster_method"] == "consensus"


def test_compare_holds_only_what_stands(tmp_path):
    from audit.report import Thresholds
    from audit.report.compare import compare_runs
    from audit.report.load import load_run

    def run(name: str, off: int):
        rows = class_rows(0, 30, CLASSES)
        rows += [
            score_row(f"df{i}", 2, CLASSES, energy_in_mask_gradcampp=0.1 if i < off else 0.8, iou_gradcampp=0.1)
            for i in range(30)
        ]
        return write_run(tmp_path / name, rows, CLASSES)

    baseline, newer = run("20261201-010000-00000001", 0), run("20261201-020000-00000002", 25)
    _sanity_file(newer)  # Grad-CAM++ fails in the newer run: its off-object rate rose, but it is no witness
    comparison = compare_runs(load_run(baseline), load_run(newer), Thresholds())
    df = next(c for c in comparison.classes if c.label_name == "df")
    assert df.regressed == [] and df.new_flags == [] and comparison.status == "pass"
    (newer / SANITY_FILE).unlink()  # without the check, the same rise is a regression
    comparison = compare_runs(load_run(baseline), load_run(newer), Thresholds())
    df = next(c for c in comparison.classes if c.label_name == "df")
    assert [c.method for c in df.regressed] == ["gradcampp"] and comparison.status == "fail"
