"""Guided backpropagation and the paper's pixel-space maps, Guided Grad-CAM and Guided Grad-CAM++.

Guided backpropagation (Springenberg et al., 2015) is the gradient of the target score with
respect to the input pixels, with every ReLU's backward clamped to positive signals:

.. math:: \\frac{\\partial}{\\partial x}\\Big|_{\\text{ReLU}} = g \\cdot [x > 0] \\cdot [g > 0]

Guided Grad-CAM (Selvaraju et al.) and Guided Grad-CAM++ (Chattopadhay et al., section 3) are
that (N, 3, H, W) gradient times the method's map bilinearly upsampled to the input size: fine
detail where the coarse map says the class is. Each costs a full backward through the network
per batch, so the audit computes them for a few images only (the report's gallery, the sanity
check's sample, ``audit explain``). Like pytorch-grad-cam, the ReLUs are the model's
``nn.ReLU`` modules; a model without any (GELU transformers, SiLU EfficientNets) gets no guided
maps, and :func:`guided_note` says why.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from audit.explain.metrics import upsample

GUIDED = {"guided-gradcam": "gradcam", "guided-gradcampp": "gradcampp"}  # guided map -> the map it multiplies


class _GuidedReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x > 0) * (grad > 0)


class GuidedReLU(nn.Module):
    """A ReLU whose backward passes only positive gradients at positive inputs."""

    def forward(self, x: Tensor) -> Tensor:
        return _GuidedReLUFunction.apply(x)


def guided_note(model: nn.Module) -> str | None:
    """Why the model gets no guided maps, or None when it has ReLU modules to guide."""
    if any(isinstance(m, nn.ReLU) for m in model.modules()):
        return None
    return "guided backpropagation needs nn.ReLU activations; this model has none"


class GuidedBackprop:
    """Guided-backpropagation gradients of a copy of ``model`` whose ``nn.ReLU`` modules are guided."""

    def __init__(self, model: nn.Module) -> None:
        note = guided_note(model)
        if note:
            raise ValueError(note)
        self.model = _with_guided_relus(copy.deepcopy(model)).eval()

    def __call__(self, images: Tensor, targets: Tensor) -> Tensor:
        """(N, 3, H, W) float32 gradients of each image's target logit with respect to its pixels."""
        images = images.detach().float().requires_grad_(True)
        with torch.enable_grad():
            logits = self.model(images)
            score = logits.float().gather(1, targets.to(logits.device).long()[:, None]).sum()
            (gradients,) = torch.autograd.grad(score, images)
        return gradients


def guided_maps(gradients: Tensor, maps: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
    """Guided Grad-CAM and Guided Grad-CAM++: (N, H, W, 3) float32, the gradients times each
    (N, h, w) map upsampled to the input size; None where the map is."""
    size = tuple(gradients.shape[-2:])
    out: dict[str, Tensor | None] = {}
    for name, method in GUIDED.items():
        coarse = maps.get(method)
        out[name] = (
            None if coarse is None else (gradients * upsample(coarse.float(), size)[:, None]).permute(0, 2, 3, 1)
        )
    return out


def guided_magnitude(guided: Tensor) -> Tensor:
    """(N, H, W) per-pixel magnitude of (N, H, W, 3) guided maps: the sum of absolute channel values."""
    return guided.abs().sum(dim=-1)


def display(guided: Tensor) -> Tensor:
    """(H, W, 3) in [0, 1] for showing a guided map: pytorch-grad-cam's ``deprocess_image`` (zero mean,
    0.1 standard deviation around grey), without its rounding to bytes."""
    x = guided - guided.mean()
    x = x / (x.std() + 1e-5) * 0.1 + 0.5
    return x.clamp(0, 1)


def _with_guided_relus(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, GuidedReLU())
        else:
            _with_guided_relus(child)
    return module
