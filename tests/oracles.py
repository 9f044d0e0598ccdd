"""Independent references for the engine's maps: the peer libraries and a float64 eq.-19 Grad-CAM++.

Each reference runs the model its own way (a full autograd graph through the whole
network), so agreement with the engine tests the one-pass shortcut as well as the formulas.

The peers normalise with ``map / (max + eps)`` (eps 1e-7 in pytorch-grad-cam, 1e-8 in
torchcam). On random-init nets a raw map's maximum can be ~1e-6, where that eps shrinks the
whole map by a few percent; a second min-max undoes exactly that scale and nothing else.
"""

from __future__ import annotations

import numpy as np
import torch
from pytorch_grad_cam import GradCAM as PgcGradCAM
from pytorch_grad_cam import GradCAMPlusPlus as PgcGradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from torchcam.methods import CAM as TorchcamCAM
from torchcam.methods import GradCAM as TorchcamGradCAM


def relu_minmax(raw: np.ndarray) -> np.ndarray:
    """ReLU then min-max per map, float64; maps without contrast become zeros."""
    maps = np.maximum(np.asarray(raw, dtype=np.float64), 0.0)
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    return np.where(span > 0, (maps - low) / np.where(span > 0, span, 1.0), 0.0)


def activations_and_gradients(model: nn.Module, layer: str, images: torch.Tensor, targets: list[int]):
    """A and dY_c/dA from a full-graph forward and backward (no shortcut), as float64 numpy."""
    module = dict(model.named_modules())[layer]
    captured = []

    def keep(_module, _args, output):
        captured.append(output)
        return output.clone()  # later in-place ops must not touch the captured tensor

    handle = module.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            images = images.clone().requires_grad_(True)
            logits = model(images)
            score = logits.gather(1, torch.tensor(targets)[:, None]).sum()
            (grads,) = torch.autograd.grad(score, captured[0])
    finally:
        handle.remove()
    return captured[0].detach().double().numpy(), grads.double().numpy()


def gradcampp_eq19(activations: np.ndarray, grads: np.ndarray, eps: float = 0.0) -> np.ndarray:
    """Grad-CAM++ from eq. 19 of the paper, written out in float64; ReLU + min-max applied."""
    maps = []
    for A, g in zip(activations, grads):  # per image: A, g are (K, h, w)
        denominator = 2 * g**2 + A.sum(axis=(1, 2))[:, None, None] * g**3 + eps
        with np.errstate(divide="ignore", invalid="ignore"):
            alpha = np.where(denominator != 0, g**2 / denominator, 0.0)
        weights = (alpha * np.maximum(g, 0)).sum(axis=(1, 2))
        maps.append(np.tensordot(weights, A, axes=1))
    return relu_minmax(np.stack(maps))


def gradcam_reference(activations: np.ndarray, grads: np.ndarray) -> np.ndarray:
    weights = grads.mean(axis=(2, 3))
    return relu_minmax(np.einsum("nk,nkhw->nhw", weights, activations))


def pytorch_grad_cam(
    method: str, model: nn.Module, layer: str, images: torch.Tensor, targets: list[int], reshape_transform=None
):
    """pytorch-grad-cam's maps at the layer's native resolution (its resize step skipped); a
    ``reshape_transform`` reads a token or channels-last layer as (N, C, h, w), as its ViT guide does."""
    cls = {"gradcam": PgcGradCAM, "gradcampp": PgcGradCAMPlusPlus}[method]
    target_layers = [dict(model.named_modules())[layer]]
    with cls(model=model, target_layers=target_layers, reshape_transform=reshape_transform) as cam:
        cam.get_target_width_height = lambda _input: None
        with torch.enable_grad():
            maps = cam(images, targets=[ClassifierOutputTarget(t) for t in targets])
    return relu_minmax(maps)


def vit_reshape_transform(height: int, width: int, prefix: int = 1):
    """pytorch-grad-cam's ViT recipe: drop the class token(s), put the patch tokens on their grid."""

    def reshape(tensor: torch.Tensor) -> torch.Tensor:
        result = tensor[:, prefix:, :].reshape(tensor.size(0), height, width, tensor.size(2))
        return result.transpose(2, 3).transpose(1, 2)

    return reshape


def swin_reshape_transform(tensor: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's recipe for a channels-last (N, H, W, C) Swin output."""
    return tensor.permute(0, 3, 1, 2)


def torchcam_gradcam(model: nn.Module, layer: str, images: torch.Tensor, targets: list[int]) -> np.ndarray:
    with TorchcamGradCAM(model, target_layer=layer) as extractor, torch.enable_grad():
        scores = model(images)
        (maps,) = extractor(targets, scores)
    return relu_minmax(maps.detach().numpy())


def torchcam_cam(model: nn.Module, layer: str, fc_layer: str, images: torch.Tensor, targets: list[int]) -> np.ndarray:
    """torchcam's CAM skips the ReLU: take its raw map, then ReLU + min-max."""
    with TorchcamCAM(model, target_layer=layer, fc_layer=fc_layer) as extractor, torch.no_grad():
        scores = model(images)
        (raw,) = extractor(targets, scores, normalized=False)
    return relu_minmax(raw.double().numpy())
