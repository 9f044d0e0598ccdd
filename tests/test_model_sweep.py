"""Torchvision's classifiers and 33 timm architectures across families: where each is explained.

For each model (random weights, a small input where the architecture allows one) the automatic
choice must be a layer of the last stage, read in the right layout on the right grid, and the
engine's maps must come out on that grid; or the model is refused with a one-line reason. The
expected grid is worked out independently of the anatomy code: from the architecture's stride
(timm's ``feature_info``, a ViT's patch size) or, for torchvision's CNNs, from the last 4-D
feature map any module outputs (the rule cam-audit used before it read other layouts).

Torchvision models over 100 M parameters are skipped with the reason (their random initialisation is
most of the cost; each family's smaller members are checked). Slow (about three minutes on a 2-core
CPU): marked ``slow``; CI runs it.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from audit.errors import ModelAnatomyError
from audit.explain import ExplainEngine
from audit.models import build_model, inspect_model
from audit.models.checkpoint import classification_architectures

pytestmark = pytest.mark.slow

# torchvision: the input each is probed at (small, where the architecture allows)
TORCHVISION_INPUT = {"inception_v3": 96, "maxvit_t": 224}
# Skipped, with the reason: past 100 M parameters, initialising the random weights is most of a
# test's cost on a 2-core CI machine (9-14 s for the largest), and each family's smaller members
# are checked (VGG: none is smaller, so vgg11 and vgg11_bn stay).
LARGEST_CHECKED = 100_000_000
KEPT_ANYWAY = ("vgg11", "vgg11_bn")
FAMILY = {"vgg": "vgg11 and vgg11_bn", "vit": "vit_b_16 and vit_b_32", "regnet": "the smaller RegNets",
          "convnext": "convnext_tiny, _small and _base", "efficientnet": "efficientnet_v2_s, _m and b0-b7",
          "wide": "wide_resnet50_2"}  # fmt: skip


def _too_large(arch: str) -> str | None:
    """Why ``arch`` is skipped, or None: its parameter count from torchvision's weights meta."""
    import torchvision

    if arch in KEPT_ANYWAY:
        return None
    try:
        count = torchvision.models.get_model_weights(arch).DEFAULT.meta["num_params"]
    except (ValueError, KeyError, AttributeError):
        return None
    if count <= LARGEST_CHECKED:
        return None
    family = next((v for k, v in FAMILY.items() if arch.startswith(k)), "its family's smaller members")
    return f"{count / 1e6:.0f} M parameters (random init is most of the test's time); checked instead: {family}"


# timm: name -> (family's layout, build options that shrink the model's input; "side": a CNN's probe input)
TIMM = {
    "resnet18": ("nchw", {"side": 64}),
    "resnet50d": ("nchw", {"side": 64}),
    "seresnext26d_32x4d": ("nchw", {"side": 64}),
    "efficientnet_b0": ("nchw", {"side": 64}),
    "tf_efficientnetv2_b0": ("nchw", {"side": 64}),
    "convnext_atto": ("nchw", {"side": 64}),
    "regnety_002": ("nchw", {"side": 64}),
    "mobilenetv3_small_050": ("nchw", {"side": 64}),
    "mobilenetv2_050": ("nchw", {"side": 64}),
    "ghostnet_100": ("nchw", {"side": 64}),
    "densenet121": ("nchw", {"side": 64}),
    "inception_v3": ("nchw", {"side": 96}),
    "hgnetv2_b0": ("nchw", {"side": 64}),
    "vit_tiny_patch16_224": ("tokens", {"img_size": 64}),
    "vit_small_patch16_224": ("tokens", {"img_size": 64}),
    "vit_small_patch14_reg4_dinov2": ("tokens", {"img_size": 56}),
    "deit_tiny_patch16_224": ("tokens", {"img_size": 64}),
    "deit_tiny_distilled_patch16_224": ("tokens", {"img_size": 64}),
    "eva02_tiny_patch14_224": ("tokens", {"img_size": 56}),
    "cait_xxs24_224": ("tokens", {"img_size": 64}),
    "pit_ti_224": ("tokens", {}),
    "levit_128s": ("tokens", {}),
    "swin_tiny_patch4_window7_224": ("nhwc", {}),
    "swinv2_cr_tiny_224": ("nchw", {}),
    "twins_svt_small": ("tokens", {}),
    "mvitv2_tiny": ("tokens", {}),
    "coatnet_0_rw_224": ("nchw", {}),
    "maxvit_nano_rw_256": ("nchw", {}),
    "vit_small_r26_s32_224": ("tokens", {}),
    "mobilevit_xxs": ("nchw", {}),
    "efficientformer_l1": ("tokens", {}),
    "fastvit_t8": ("nchw", {}),
    "edgenext_xx_small": ("nchw", {}),
}
# refused with a reason, and why that is right
TIMM_REFUSED = {"crossvit_tiny_240": "two branches of token streams on different patch grids"}


def _explain_once(model: nn.Module, size: tuple[int, int], anatomy) -> None:
    """The engine's maps are on the anatomy's grid, finite, and not all empty.

    Zero-initialised weights (torchvision's ViT head, LeViT's) pass no gradient; a trained model
    has none, so they are given small random values first."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim >= 2 and not parameter.any():
                parameter.normal_(0, 0.02)
    engine = ExplainEngine(model, size, anatomy=anatomy)
    explained = engine(torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(3)))
    maps = {m: v for m, v in explained.maps.items() if v is not None}
    assert maps and all(v.shape == (1, *anatomy.layout.grid) and torch.isfinite(v).all() for v in maps.values())
    assert not all(bool(explained.empty[m].all()) for m in maps)


def _last_4d_grid(model: nn.Module, size: tuple[int, int]) -> tuple[int, int] | None:
    """The grid of the last (N, C, H, W) output of a non-pooling module: the rule before layouts."""
    grids: list[tuple[int, int]] = []
    pools = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)

    def keep(module, _args, output):
        if isinstance(output, torch.Tensor) and output.ndim == 4 and not isinstance(module, pools):
            if output.shape[1] > output.shape[-1] and output.shape[-2] * output.shape[-1] > 1:
                grids.append(tuple(output.shape[-2:]))

    handles = [m.register_forward_hook(keep) for m in model.modules()]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *size))
    finally:
        for handle in handles:
            handle.remove()
    return grids[-1] if grids else None


@pytest.mark.parametrize("arch", sorted(classification_architectures()))
def test_every_torchvision_classifier_is_explained_in_its_last_stage(arch):
    reason = _too_large(arch)
    if reason:
        pytest.skip(reason)
    side = TORCHVISION_INPUT.get(arch, 64)
    size = (side, side)
    torch.manual_seed(0)
    model = build_model(arch, 5, size).eval()
    anatomy = inspect_model(model, size)
    layout = anatomy.layout
    if arch.startswith("vit_"):
        patch = int(re.search(r"_(\d+)$", arch).group(1))
        last = len(model.encoder.layers) - 1
        assert layout.kind == "tokens" and layout.prefix_tokens == 1
        assert layout.grid == (side // patch, side // patch)
        assert anatomy.target_layer.startswith(f"encoder.layers.encoder_layer_{last}")
    elif arch.startswith("swin"):
        assert layout.grid == (math.ceil(side / 32),) * 2 and layout.kind in ("nchw", "nhwc")
    else:
        assert layout.kind == "nchw" and layout.grid == _last_4d_grid(model, size)
    _explain_once(model, size, anatomy)


@pytest.mark.parametrize("name", sorted(TIMM))
def test_timm_architectures_across_families_are_explained_in_their_last_stage(name):
    import timm

    expected_layout, options = TIMM[name]
    options = dict(options)
    small = options.pop("side", None)  # a CNN takes any input: probed small
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **options).eval()
    side = small or options.get("img_size") or model.pretrained_cfg["input_size"][-1]
    size = (side, side)
    anatomy = inspect_model(model, size)
    layout = anatomy.layout
    stride = model.feature_info[-1]["reduction"]
    assert layout.kind == expected_layout
    # within what convolutions without padding cut off (Inception: 8x8 at 299 / 32 = 9.3)
    assert all(abs(cells - side / stride) <= 1.5 for cells in layout.grid), (layout.grid, side / stride)
    if layout.kind == "tokens":
        assert layout.prefix_tokens == getattr(model, "num_prefix_tokens", layout.prefix_tokens)
        assert ".attn." not in anatomy.target_layer  # never a tensor inside an attention
    _explain_once(model, size, anatomy)


@pytest.mark.parametrize("name", sorted(TIMM_REFUSED))
def test_a_model_no_layer_of_whose_last_stage_can_be_read_is_refused_in_one_line(name):
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=5).eval()
    side = model.pretrained_cfg["input_size"][-1]
    with pytest.raises(ModelAnatomyError, match="--target-layer") as caught:
        inspect_model(model, (side, side))
    assert "\n" not in str(caught.value)
