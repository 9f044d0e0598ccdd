"""CAM, Grad-CAM and Grad-CAM++: raw maps from one layer's activations and gradients.

Notation, for a batch of N images with per-image target class c:
``A`` (N, K, h, w) are the target layer's activations and ``g = dY_c / dA`` their
gradients, both float32. Each method returns the raw map ``sum_k w_k A_k`` (N, h, w)
before ReLU and normalisation, which :func:`normalize` applies to all of them alike.
"""

from __future__ import annotations

import torch
from torch import Tensor

from audit.models.anatomy import CamHead

METHODS = ("cam", "gradcam", "gradcampp")


def weighted_sum(weights: Tensor, activations: Tensor) -> Tensor:
    """``sum_k weights[n, k] * activations[n, k]``: (N, K) x (N, K, h, w) -> (N, h, w)."""
    return torch.einsum("nk,nkhw->nhw", weights, activations)


class CAM:
    r"""Class activation map (Zhou et al., 2016).

    .. math:: L^c = \sum_k W_{c,k} f(A_k)

    with ``W`` the linear layer that reads the global-average-pool of ``f(A)``; ``f`` is
    the identity, or the ReLU a network applies between its feature map and the pool.
    Needs no gradient.
    """

    name = "cam"

    def __init__(self, head: CamHead) -> None:
        self.head = head

    def __call__(self, activations: Tensor, gradients: Tensor, targets: Tensor) -> Tensor:
        del gradients
        weight = self.head.weight.to(device=activations.device, dtype=activations.dtype)
        features = activations.relu() if self.head.activation == "relu" else activations
        return weighted_sum(weight[targets], features)


class GradCAM:
    r"""Grad-CAM (Selvaraju et al., 2017).

    .. math:: w_k = \frac{1}{hw} \sum_{ij} g_{kij}, \qquad L^c = \sum_k w_k A_k
    """

    name = "gradcam"

    def __call__(self, activations: Tensor, gradients: Tensor, targets: Tensor) -> Tensor:
        del targets
        return weighted_sum(gradients.mean(dim=(2, 3)), activations)


class GradCAMPlusPlus:
    r"""Grad-CAM++ (Chattopadhay et al., 2018), eq. 19 with exponential-score derivatives.

    .. math::
        \alpha_{kij} = \frac{g_{kij}^2}{2 g_{kij}^2 + \sum_{ab} A_{kab}\, g_{kij}^3 + \epsilon},
        \qquad w_k = \sum_{ij} \alpha_{kij} \operatorname{ReLU}(g_{kij}),
        \qquad L^c = \sum_k w_k A_k

    with ``alpha = 0`` where the denominator is 0. ``eps = 0`` is eq. 19 exactly;
    pytorch-grad-cam hard-codes ``eps = 1e-6``, which moves maps by 0.01-0.03 on nets whose
    gradients are small (Grad-CAM++ is not scale-invariant). Computed in float32: ``g^3``
    underflows in half precision.
    """

    name = "gradcampp"

    def __init__(self, eps: float = 0.0) -> None:
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.eps = eps

    def __call__(self, activations: Tensor, gradients: Tensor, targets: Tensor) -> Tensor:
        del targets
        g2 = gradients.square()
        g3 = g2 * gradients
        activation_sums = activations.sum(dim=(2, 3), keepdim=True)
        denominator = 2 * g2 + activation_sums * g3 + self.eps
        safe = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
        alpha = torch.where(denominator != 0, g2 / safe, torch.zeros_like(g2))
        weights = (alpha * gradients.relu()).sum(dim=(2, 3))
        return weighted_sum(weights, activations)


def normalize(raw: Tensor) -> tuple[Tensor, Tensor]:
    """ReLU, then min-max to [0, 1] per map. Returns ``(maps, empty)``.

    A map without contrast (zero everywhere after the ReLU, or constant) points nowhere:
    it comes back as zeros with ``empty = True``, never as NaN.
    """
    maps = raw.relu()
    flat = maps.flatten(1)
    low = flat.amin(dim=1)
    span = flat.amax(dim=1) - low
    empty = span <= 0
    scale = torch.where(empty, torch.ones_like(span), span)
    normalized = (maps - low[:, None, None]) / scale[:, None, None]
    return normalized.masked_fill(empty[:, None, None], 0.0), empty
