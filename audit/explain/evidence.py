"""Evidence by intervention: change the image, watch the answer. Forwards only, batched.

A map can be wrong about what the model uses; changing the image and watching the answer
tests the model itself, whatever the map's resolution.

**Occlusion counterfactuals.** The object mask (at the model's input size) is dilated by
``radius`` pixels, so the object's rim does not leak it, and

* *object hidden*: the dilated object is replaced by the fill;
* *object alone*: everything outside the dilated object is replaced by the fill.

The fill is the image's own skin colour: the per-channel median of the pixels outside the
dilated object, one flat colour per image, blended in over a soft edge
(``soft = avgpool_k(dilated)``, ``k = 2 (radius // 2) + 1``, so the object itself is always
fully covered). A black or grey box would put a colour and a sharp contour into the image
that the model may have learnt as a class signal (a dark corner, a sticker); the median
skin colour adds neither: its colour is already the image's most common one, its edge is
feathered, and the median ignores the artefacts, which cover a minority of the background.
For each, the target's probability and the predicted class are recorded.

**Faithfulness** (Chattopadhay et al., 2018, sec. 6.1): the explanation map
``E = L * I``, the image times the method's map upsampled to the input size, goes through
the model. With ``Y`` the target's softmax probability on the image and ``O`` on ``E``:

.. math:: \\mathrm{drop} = \\frac{\\max(0, Y - O)}{Y}, \\qquad \\mathrm{increase} = [O > Y]

Average Drop % and Increase in Confidence % are their means over images. As in
pytorch-grad-cam's ``CamMultImageConfidenceChange`` the product is taken on the normalised
input, so a region the map rules out becomes the dataset's mean colour, not black.

Every kind of evidence is one batched call of the model (in chunks of the batch's size), never
one per image; maps equal by construction (CAM and Grad-CAM on a global-average-pool head)
share their forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from audit.config import EVIDENCE
from audit.explain.engine import ExplainEngine, Explanation
from audit.explain.metrics import Scores, consensus, upsample

FAITHFUL = ("cam", "gradcam", "gradcampp", "consensus")
OCCLUSION_COLUMNS = ("object_hidden_prob", "object_hidden_pred", "object_alone_prob", "object_alone_pred")
FAITHFULNESS_COLUMNS = tuple(f"{kind}_{m}" for m in FAITHFUL for kind in ("drop", "increase"))
NO_MASK_NOTE = "occlusion: no object mask"


def evidence_kinds(evidence: str) -> tuple[str, ...]:
    """``all`` -> (occlusion, faithfulness); ``none`` -> ()."""
    if evidence not in EVIDENCE:
        raise ValueError(f"evidence must be one of {', '.join(EVIDENCE)}, got {evidence!r}")
    return {"none": (), "all": ("occlusion", "faithfulness")}.get(evidence, (evidence,))


def dilation_radius(input_size: tuple[int, int]) -> int:
    """A few pixels: 4% of the shorter side, at least 2 (5 px at 128, 9 px at 224)."""
    return max(2, round(0.04 * min(input_size)))


@dataclass(frozen=True)
class Counterfactuals:
    """The two occluded batches of (N, 3, H, W) images, in the same (normalised) space as the input."""

    object_hidden: Tensor
    object_alone: Tensor


def counterfactuals(images: Tensor, masks: Tensor, radius: int) -> Counterfactuals:
    """Hide the object, and keep the object alone, each with the image's own skin colour.

    ``images`` (N, 3, H, W) float, any per-channel affine normalisation (the median commutes
    with it); ``masks`` (N, H, W) bool object masks at the same size.
    """
    dilated = dilate(masks, radius)
    fill = skin_fill(images, ~dilated)
    soft = feather(dilated, radius)[:, None]
    hidden = images * (1 - soft) + fill * soft
    alone = images * soft + fill * (1 - soft)
    return Counterfactuals(hidden, alone)


def dilate(masks: Tensor, radius: int) -> Tensor:
    """Binary dilation by a (2 radius + 1) square: (N, H, W) bool -> (N, H, W) bool."""
    if radius <= 0:
        return masks.bool()
    grown = F.max_pool2d(masks[:, None].float(), kernel_size=2 * radius + 1, stride=1, padding=radius)
    return grown[:, 0] > 0


def feather(region: Tensor, radius: int) -> Tensor:
    """A soft edge for a dilated region: box blur of width 2 (radius // 2) + 1, values in [0, 1].

    Pixels deeper than ``radius // 2`` inside the region stay exactly 1, so with the region
    dilated by ``radius`` the object under it is always fully replaced."""
    half = radius // 2
    if half == 0:
        return region.float()
    padded = F.pad(region[:, None].float(), (half, half, half, half), mode="replicate")
    return F.avg_pool2d(padded, kernel_size=2 * half + 1, stride=1)[:, 0]


def skin_fill(images: Tensor, background: Tensor) -> Tensor:
    """(N, 3, 1, 1): the per-channel median of each image over its ``background`` pixels, or
    over the whole image where the object covers everything."""
    empty = ~background.flatten(1).any(dim=1)
    keep = background | empty[:, None, None]
    values = images.float().masked_fill(~keep[:, None], float("nan"))
    return values.flatten(2).nanmedian(dim=2).values[:, :, None, None].to(images.dtype)


def explanation_images(images: Tensor, maps: dict[str, Tensor]) -> Tensor:
    """(M N, 3, H, W): ``images * map`` for each of the M maps (N, h, w), upsampled bilinearly."""
    size = tuple(images.shape[-2:])
    return torch.cat([images * upsample(m.to(images.dtype), size)[:, None] for m in maps.values()])


def distinct_maps(maps: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The maps that differ from every earlier one, and for each method the one it equals.

    On a global-average-pool -> linear network explained at its last feature map, CAM and
    Grad-CAM are the same map by construction; their explanation images are then one forward."""
    kept: dict[str, Tensor] = {}
    same: dict[str, str] = {}
    for name, values in maps.items():
        twin = next((k for k, v in kept.items() if torch.allclose(v, values, rtol=0, atol=1e-6)), None)
        if twin is None:
            kept[name] = values
        same[name] = twin or name
    return kept, same


def faithfulness(original: Tensor, explained: Tensor) -> tuple[Tensor, Tensor]:
    """Per image, from the target's probability on the image (``original``, (N,)) and on the
    explanation map (``explained``, (N,)): ``drop = max(0, Y - O) / Y`` and ``increase = O > Y``."""
    drop = (original - explained).clamp(min=0) / original.clamp(min=torch.finfo(original.dtype).tiny)
    return drop, explained > original


def gather_evidence(
    engine: ExplainEngine,
    images: Tensor,
    explanations: list[Explanation],
    kinds: tuple[str, ...],
    masks: Tensor | None = None,
    has_mask: Tensor | None = None,
    chunk: int | None = None,
) -> list[Scores]:
    """The evidence columns of each explanation (one per explained target set of the same images).

    ``masks`` (N, H, W) bool at the input size, ``has_mask`` (N,) bool: occlusion is defined
    only where a row has a mask. ``chunk`` bounds the images per forward (default: N, the batch
    the model already holds; larger batches were slower per image on a CPU)."""
    n = images.shape[0]
    chunk = chunk or max(1, n)
    scores = [Scores({}, {}) for _ in explanations]
    if "occlusion" in kinds and masks is not None and n:
        defined = masks.flatten(1).any(dim=1) & (has_mask if has_mask is not None else True)
        made = counterfactuals(images, masks.bool(), dilation_radius(tuple(images.shape[-2:])))
        probs = engine.predict(torch.cat([made.object_hidden, made.object_alone]), chunk)
        for what, part in (("object_hidden", probs[:n]), ("object_alone", probs[n:])):
            for explanation, out in zip(explanations, scores):
                target_prob = part.gather(1, explanation.targets[:, None])[:, 0]
                out.add(f"{what}_prob", target_prob, defined)
                out.add(f"{what}_pred", part.argmax(dim=1), defined)
    if "faithfulness" in kinds and n:
        for explanation, out in zip(explanations, scores):
            maps = {m: v.float() for m, v in explanation.maps.items() if v is not None}
            maps["consensus"], _ = consensus(maps)
            distinct, same = distinct_maps(maps)
            probs = engine.predict(explanation_images(images, distinct), chunk)
            original = explanation.probs.gather(1, explanation.targets[:, None])[:, 0]
            for method in maps:
                position = list(distinct).index(same[method])
                part = probs[position * n : (position + 1) * n]
                explained = part.gather(1, explanation.targets[:, None])[:, 0]
                drop, increase = faithfulness(original, explained)
                defined = torch.ones(n, dtype=torch.bool, device=drop.device)
                out.add(f"drop_{method}", drop, defined)
                out.add(f"increase_{method}", increase, defined)
    return scores
