"""Our maps against the peers and an independent eq.-19 reference, on random-init models.

For each architecture, for the predicted class and for a class that is not predicted
(whose maps have mixed signs, so the ReLU matters):
- Grad-CAM equals pytorch-grad-cam's, torchcam's and a float64 reference, to 1e-5;
- CAM equals min-max(ReLU(torchcam CAM)), to 1e-5, where the model has a GAP -> linear head;
- Grad-CAM++ equals the float64 eq.-19 reference to 1e-5, and, with eps=1e-6,
  pytorch-grad-cam's, to 1e-5; without that eps the two differ by more than 1e-3.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audit.explain import ExplainEngine, GradCAM
from tests import oracles
from tests.conftest import random_images, random_model

SIZE = 128
TOL = 1e-5

# (architecture, target layer for the peers or None for the automatic one)
CASES = [
    ("resnet18", None),
    ("resnet50", None),
    ("efficientnet_b0", None),
    ("mobilenet_v3_small", None),
    ("convnext_tiny", None),
    ("regnet_y_400mf", None),
    ("vgg11", None),
    # DenseNet applies an in-place ReLU to `features`; the peers' hooks then see the gradient
    # of the ReLU's output, not of `features`. One block earlier there is no in-place op.
    ("densenet121", "features.denseblock4"),
]


def _targets(engine: ExplainEngine, images: torch.Tensor, kind: str) -> torch.Tensor | None:
    if kind == "pred":
        return None
    with torch.no_grad():
        preds = engine.model(images).argmax(dim=1)
    return (preds + 1) % 5


def _max_diff(ours: torch.Tensor, reference: np.ndarray) -> float:
    return float(np.abs(ours.double().numpy() - reference).max())


@pytest.fixture(scope="module", params=CASES, ids=[arch for arch, _ in CASES])
def case(request):
    arch, peer_layer = request.param
    model = random_model(arch)
    images = random_images(2, SIZE)
    return arch, peer_layer, model, images


@pytest.mark.parametrize("kind", ["pred", "other"])
def test_gradcam_and_cam_match_peers(case, kind):
    arch, peer_layer, model, images = case
    engine = ExplainEngine(model, (SIZE, SIZE), target_layer=peer_layer)
    result = engine(images, _targets(engine, images, kind))
    layer, targets = engine.anatomy.target_layer, result.targets.tolist()
    if kind == "other":
        assert (result.targets != result.preds).all()

    activations, grads = oracles.activations_and_gradients(model, layer, images, targets)
    assert _max_diff(result.maps["gradcam"], oracles.gradcam_reference(activations, grads)) < TOL
    assert _max_diff(result.maps["gradcam"], oracles.pytorch_grad_cam("gradcam", model, layer, images, targets)) < TOL
    assert _max_diff(result.maps["gradcam"], oracles.torchcam_gradcam(model, layer, images, targets)) < TOL

    if engine.anatomy.cam_head is None:
        assert result.maps["cam"] is None and result.empty["cam"] is None
        assert "CAM needs" in result.notes["cam"]
    else:
        head = engine.anatomy.cam_head.name
        assert _max_diff(result.maps["cam"], oracles.torchcam_cam(model, layer, head, images, targets)) < TOL


@pytest.mark.parametrize("kind", ["pred", "other"])
def test_gradcampp_matches_eq19_and_pytorch_grad_cam_with_its_eps(case, kind):
    arch, peer_layer, model, images = case
    exact = ExplainEngine(model, (SIZE, SIZE), target_layer=peer_layer)
    with_eps = ExplainEngine(model, (SIZE, SIZE), target_layer=peer_layer, gradcampp_eps=1e-6)
    targets_in = _targets(exact, images, kind)
    ours_exact, ours_eps = exact(images, targets_in), with_eps(images, targets_in)
    layer, targets = exact.anatomy.target_layer, ours_exact.targets.tolist()

    activations, grads = oracles.activations_and_gradients(model, layer, images, targets)
    assert _max_diff(ours_exact.maps["gradcampp"], oracles.gradcampp_eq19(activations, grads)) < TOL
    assert _max_diff(ours_eps.maps["gradcampp"], oracles.gradcampp_eq19(activations, grads, eps=1e-6)) < TOL

    peer = oracles.pytorch_grad_cam("gradcampp", model, layer, images, targets)
    assert _max_diff(ours_eps.maps["gradcampp"], peer) < TOL
    # The eps is not cosmetic: Grad-CAM++ is not scale-invariant, so eq. 19 differs from the peer.
    assert _max_diff(ours_exact.maps["gradcampp"], peer) > 1e-3


# Transformers at 64x64, random weights: (timm name, build options, reshape transform as the peer's guides write it)
TRANSFORMERS = [
    ("vit_tiny_patch16_224", {"img_size": 64}, oracles.vit_reshape_transform(4, 4)),
    ("deit_tiny_distilled_patch16_224", {"img_size": 64}, oracles.vit_reshape_transform(4, 4, prefix=2)),
    ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 4}, oracles.swin_reshape_transform),
]


@pytest.mark.parametrize(("name", "options", "reshape"), TRANSFORMERS, ids=[t[0] for t in TRANSFORMERS])
@pytest.mark.parametrize("kind", ["pred", "other"])
def test_transformer_maps_match_pytorch_grad_cam_with_its_reshape_transform(name, options, reshape, kind):
    """At the layer cam-audit chooses, Grad-CAM and Grad-CAM++ (eps 1e-6) on patch tokens and on a
    channels-last Swin output equal pytorch-grad-cam's with the reshape_transform of its guides."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **options).eval()
    images = random_images(2, 64)
    engine = ExplainEngine(model, (64, 64), gradcampp_eps=1e-6)
    result = engine(images, _targets(engine, images, kind))
    layer, targets = engine.anatomy.target_layer, result.targets.tolist()
    assert result.maps["gradcam"].shape == (2, *engine.anatomy.layout.grid)
    for method in ("gradcam", "gradcampp"):
        peer = oracles.pytorch_grad_cam(method, model, layer, images, targets, reshape_transform=reshape)
        assert _max_diff(result.maps[method], peer) < TOL
        assert not result.empty[method].any()


def test_non_predicted_targets_have_mixed_sign_maps():
    """The ReLU is exercised: raw Grad-CAM maps of a non-predicted class have both signs."""
    model = random_model("resnet18")
    images = random_images(2, SIZE)
    engine = ExplainEngine(model, (SIZE, SIZE))
    targets = _targets(engine, images, "other")
    activations, grads = oracles.activations_and_gradients(model, "layer4", images, targets.tolist())
    raw = GradCAM()(torch.from_numpy(activations), torch.from_numpy(grads), targets)
    assert (raw < 0).any() and (raw > 0).any()


def test_densenet_default_layer_matches_the_float64_reference():
    """At `features` (pre-ReLU), where the peers' hooks are confused by the in-place ReLU."""
    model = random_model("densenet121")
    images = random_images(2, SIZE)
    engine = ExplainEngine(model, (SIZE, SIZE))
    assert engine.anatomy.target_layer == "features"
    result = engine(images)
    activations, grads = oracles.activations_and_gradients(model, "features", images, result.targets.tolist())
    assert _max_diff(result.maps["gradcam"], oracles.gradcam_reference(activations, grads)) < TOL
    assert _max_diff(result.maps["gradcampp"], oracles.gradcampp_eq19(activations, grads)) < TOL
    cam = oracles.relu_minmax(
        np.einsum(
            "nk,nkhw->nhw",
            engine.anatomy.cam_head.weight.double().numpy()[result.targets.numpy()],
            np.maximum(activations, 0),
        )
    )
    assert _max_diff(result.maps["cam"], cam) < TOL
