"""The engine's contract: one pass, shapes, invariances, empty maps, hooks, mixed precision."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from audit.explain import CAM, ExplainEngine, GradCAM
from audit.explain.methods import normalize
from audit.models import inspect_model
from tests import oracles
from tests.conftest import TinyGapNet, random_images, random_model

SIZE = 96


@pytest.fixture(scope="module")
def resnet18():
    return random_model("resnet18")


def test_output_shapes_ranges_and_defaults(resnet18):
    result = ExplainEngine(resnet18, (SIZE, SIZE))(random_images(3, SIZE))
    assert result.logits.shape == result.probs.shape == (3, 5)
    assert torch.allclose(result.probs.sum(dim=1), torch.ones(3))
    assert torch.equal(result.targets, result.logits.argmax(dim=1))  # default: the predicted class
    for name in ("cam", "gradcam", "gradcampp"):
        maps = result.maps[name]
        assert maps.shape == (3, 3, 3) and maps.dtype == torch.float32
        assert maps.min() >= 0 and maps.max() <= 1 and not maps.isnan().any()
        assert result.empty[name].shape == (3,)


def test_one_forward_and_no_backbone_graph(resnet18):
    """The backbone runs without grad, only the head on top of the target layer records a graph."""
    engine = ExplainEngine(resnet18, (SIZE, SIZE))
    seen = {}

    def watch(name):
        def hook(_module, args, output):
            seen.setdefault(name, []).append((torch.is_grad_enabled(), output.requires_grad, args[0].requires_grad))

        return hook

    handles = [
        resnet18.register_forward_hook(watch("model")),
        resnet18.layer1.register_forward_hook(watch("layer1")),
        resnet18.layer4.register_forward_hook(watch("layer4")),
        resnet18.fc.register_forward_hook(watch("fc")),
    ]
    try:
        engine(random_images(2, SIZE))
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen["model"]) == 1  # one forward
    assert seen["layer1"] == [(False, False, False)]  # no graph in the backbone
    assert seen["layer4"][0][1] is False  # the target layer itself ran without grad
    assert seen["fc"] == [(True, True, True)]  # the head records a graph from A on


def test_batch_invariance(resnet18):
    engine = ExplainEngine(resnet18, (SIZE, SIZE))
    images = random_images(8, SIZE)
    batch = engine(images)
    for i in range(8):
        single = engine(images[i : i + 1])
        assert torch.equal(single.targets, batch.targets[i : i + 1])
        for name in ("cam", "gradcam", "gradcampp"):
            assert torch.allclose(single.maps[name], batch.maps[name][i : i + 1], atol=1e-5)


def test_deterministic_on_cpu(resnet18):
    engine = ExplainEngine(resnet18, (SIZE, SIZE))
    images = random_images(4, SIZE)
    first, second = engine(images), engine(images)
    for name in ("cam", "gradcam", "gradcampp"):
        assert torch.equal(first.maps[name], second.maps[name])


def test_given_targets_are_explained(resnet18):
    engine = ExplainEngine(resnet18, (SIZE, SIZE))
    images = random_images(2, SIZE)
    for target in range(5):
        result = engine(images, torch.tensor([target, target]))
        assert result.targets.tolist() == [target, target]
    distinct = [engine(images, torch.tensor([t, t])).maps["gradcam"] for t in (0, 1)]
    assert not torch.allclose(distinct[0], distinct[1])


@pytest.mark.parametrize("targets", [[0, 5], [-1, 0], [0]])
def test_bad_targets_are_rejected(resnet18, targets):
    engine = ExplainEngine(resnet18, (SIZE, SIZE))
    with pytest.raises(ValueError):
        engine(random_images(2, SIZE), torch.tensor(targets))


def test_gradcam_is_proportional_to_cam_on_the_last_feature_map_of_a_gap_linear_net(resnet18):
    """dY_c/dA_kij = W[c, k] / (h w): the Grad-CAM weights are W[c, :] / (h w)."""
    engine = ExplainEngine(resnet18, (SIZE, SIZE))
    assert engine.anatomy.gradcam_proportional_to_cam
    images = random_images(3, SIZE)
    targets = [0, 2, 4]
    activations, grads = oracles.activations_and_gradients(resnet18, "layer4", images, targets)
    a, g, t = torch.from_numpy(activations), torch.from_numpy(grads), torch.tensor(targets)
    raw_cam = CAM(engine.anatomy.cam_head)(a, g, t)
    raw_gradcam = GradCAM()(a, g, t)
    h, w = a.shape[-2:]
    assert torch.allclose(raw_gradcam, raw_cam / (h * w), rtol=1e-5, atol=1e-6)
    result = engine(images, t)
    assert torch.allclose(result.maps["gradcam"], result.maps["cam"], atol=1e-5)


def test_gradcam_is_not_cam_where_a_relu_sits_between_map_and_pool():
    anatomy = inspect_model(random_model("densenet121"), (64, 64))
    assert anatomy.cam_head.activation == "relu" and not anatomy.gradcam_proportional_to_cam


@pytest.mark.parametrize("arch", ["resnet18", "densenet121", "efficientnet_b0", "regnet_y_400mf"])
def test_cam_decomposes_the_logit(arch):
    """Where CAM applies, mean_ij CAM_c + b_c is exactly the logit of class c."""
    model = random_model(arch)
    anatomy = inspect_model(model, (SIZE, SIZE))
    images = random_images(2, SIZE)
    targets = torch.tensor([1, 3])
    activations, grads = oracles.activations_and_gradients(model, anatomy.target_layer, images, targets.tolist())
    raw = CAM(anatomy.cam_head)(torch.from_numpy(activations).float(), torch.from_numpy(grads).float(), targets)
    with torch.no_grad():
        logits = model(images).gather(1, targets[:, None])[:, 0]
    assert torch.allclose(raw.mean(dim=(1, 2)) + anatomy.cam_head.bias[targets], logits, atol=1e-4)


def test_empty_maps_are_flagged_not_nan():
    model = TinyGapNet()
    with torch.no_grad():
        model.fc.weight.zero_()  # every gradient and every CAM weight is zero
    result = ExplainEngine(model, (16, 16))(random_images(2, 16))
    for name in ("cam", "gradcam", "gradcampp"):
        assert result.empty[name].all()
        assert not result.maps[name].isnan().any() and (result.maps[name] == 0).all()


def test_normalize_flags_constant_maps():
    maps, empty = normalize(torch.stack([torch.full((2, 2), 3.0), torch.tensor([[0.0, 1.0], [2.0, 4.0]])]))
    assert empty.tolist() == [True, False]
    assert maps[0].eq(0).all() and maps[1].tolist() == [[0.0, 0.25], [0.5, 1.0]]


def test_tiny_custom_net_has_cam():
    anatomy = inspect_model(TinyGapNet(), (16, 16))
    assert anatomy.target_layer == "features" and anatomy.cam_head.name == "fc"


class _Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_hooks_are_removed_and_grad_mode_restored_when_a_call_raises(resnet18):
    engine = ExplainEngine(resnet18, (SIZE, SIZE))
    hooks_before = len(resnet18.layer4._forward_hooks)
    original_fc = resnet18.fc
    resnet18.fc = _Boom()
    try:
        with torch.no_grad():
            with pytest.raises(RuntimeError, match="boom"):
                engine(random_images(1, SIZE))
            assert not torch.is_grad_enabled()  # the caller's mode survives the hook's switch
    finally:
        resnet18.fc = original_fc
    assert len(resnet18.layer4._forward_hooks) == hooks_before
    assert torch.is_grad_enabled()
    assert engine(random_images(1, SIZE)).maps["gradcam"] is not None


def test_explain_works_when_called_under_no_grad(resnet18):
    engine = ExplainEngine(resnet18, (SIZE, SIZE))
    images = random_images(2, SIZE)
    with torch.no_grad():
        inside = engine(images)
    outside = engine(images)
    assert torch.equal(inside.maps["gradcampp"], outside.maps["gradcampp"])


def test_vgg_has_no_cam_but_both_gradient_methods():
    result = ExplainEngine(random_model("vgg11"), (64, 64))(random_images(2, 64))
    assert result.maps["cam"] is None and "classifier" in result.notes["cam"]
    assert result.maps["gradcam"] is not None and result.maps["gradcampp"] is not None


def test_bfloat16_autocast_keeps_maps_in_float32_and_close(resnet18):
    images = random_images(2, SIZE)
    exact = ExplainEngine(resnet18, (SIZE, SIZE))(images)
    mixed = ExplainEngine(resnet18, (SIZE, SIZE), autocast_dtype=torch.bfloat16)(images, exact.targets)
    for name in ("cam", "gradcam", "gradcampp"):
        assert mixed.maps[name].dtype == torch.float32 and not mixed.maps[name].isnan().any()
        assert (mixed.maps[name] - exact.maps[name]).abs().max() < 0.1
    assert mixed.logits.dtype == torch.float32


def test_channels_last_model_gives_the_same_maps(resnet18):
    images = random_images(2, SIZE)
    plain = ExplainEngine(resnet18, (SIZE, SIZE))(images)
    model = random_model("resnet18").to(memory_format=torch.channels_last)
    fast = ExplainEngine(model, (SIZE, SIZE))(images.contiguous(memory_format=torch.channels_last))
    for name in ("cam", "gradcam", "gradcampp"):
        assert torch.allclose(plain.maps[name], fast.maps[name], atol=1e-4)


def test_explain_many_shares_the_forward_and_equals_separate_calls(resnet18):
    engine = ExplainEngine(resnet18, (SIZE, SIZE))
    images = random_images(3, SIZE)
    labels = torch.tensor([0, 1, 2])
    calls = []
    handle = resnet18.register_forward_hook(lambda *_: calls.append(1))
    try:
        predicted, given = engine.explain_many(images, [None, labels])
    finally:
        handle.remove()
    assert len(calls) == 1
    for combined, alone in ((predicted, engine(images)), (given, engine(images, labels))):
        assert torch.equal(combined.targets, alone.targets)
        for name in ("cam", "gradcam", "gradcampp"):
            assert torch.allclose(combined.maps[name], alone.maps[name], atol=1e-6)
