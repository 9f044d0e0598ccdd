"""Per-row scores of an explanation, batched on the maps' device.

Agreement between methods (on maps upsampled bilinearly to a ``grid`` x ``grid`` square):

* ``agree_spearman_a_b``: Spearman rank correlation, average ranks for ties (as
  ``scipy.stats.spearmanr``), i.e. the Pearson correlation of the ranks.
* ``agree_topk_iou_a_b``: IoU of the two top-k% regions. The top-k% region of a map is
  every pixel ``>=`` its k-quantile from the top that is also ``> 0`` (a ReLU'd map with
  fewer than k% positive pixels keeps only those).

Localization of each method and of the consensus (the mean of the available normalised
maps, min-max normalised again) against a binary object mask, on maps upsampled to the
mask's resolution:

* ``energy_in_mask_m = sum(map * mask) / sum(map)``: the share of the map's mass on the object;
  ``mask_area``, the share of the image the mask covers, is what a map spread evenly would score;
* ``pointing_hit_m``: the map's maximum lies on the object (pointing game, no tolerance);
* ``iou_m``: IoU of ``map >= delta`` with the mask;
* ``loc_m``, where a box (x0, y0, x1, y1 as fractions of the image) is given: the Grad-CAM++
  paper's ``Loc(delta) = sum_in E / (area(box) + sum_out E)``, with ``E`` the map with values
  below ``delta`` set to 0 and areas in pixels of the same grid.

Undefined scores are null, never NaN: agreement with an empty (contrast-free) map, and
localization of an empty map or against an empty or missing mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import torch
import torch.nn.functional as F
from torch import Tensor

from audit.explain.methods import METHODS

METHOD_PAIRS = tuple(combinations(METHODS, 2))
LOCALIZED = (*METHODS, "consensus")


@dataclass(frozen=True)
class MetricSettings:
    """``grid``: side of the square agreement is computed on; ``topk``: share of pixels in the
    top region; ``delta``: threshold of a normalised map for IoU and Loc(delta)."""

    grid: int = 56
    topk: float = 0.2
    delta: float = 0.5

    def __post_init__(self) -> None:
        if self.grid < 2:
            raise ValueError(f"grid must be >= 2, got {self.grid}")
        if not 0 < self.topk <= 1:
            raise ValueError(f"topk must be in (0, 1], got {self.topk}")
        if not 0 < self.delta <= 1:
            raise ValueError(f"delta must be in (0, 1], got {self.delta}")


@dataclass
class Scores:
    """Per-row score columns: ``values[name]`` (N,) with ``defined[name]`` (N,) bool."""

    values: dict[str, Tensor]
    defined: dict[str, Tensor]

    def add(self, name: str, values: Tensor, defined: Tensor) -> None:
        self.values[name] = values.float()
        self.defined[name] = defined

    def columns(self) -> dict[str, list[float | bool | None]]:
        """Plain Python columns for a table: undefined entries become None (null, not NaN)."""
        columns: dict[str, list[float | bool | None]] = {}
        for name, values in self.values.items():
            kind = bool if name.startswith(("pointing_hit_", "increase_")) else int if name.endswith("_pred") else float
            rows = values.cpu().tolist()
            defined = self.defined[name].cpu().tolist()
            columns[name] = [kind(v) if ok else None for v, ok in zip(rows, defined)]
        return columns


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of (N, h, w) maps to ``size`` (align_corners=False, as in torchvision)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def average_ranks(x: Tensor) -> Tensor:
    """Ranks 1..n along the last dim, ties sharing their average rank (scipy's 'average')."""
    ordered = x.sort(dim=-1).values.contiguous()
    below = torch.searchsorted(ordered, x.contiguous(), right=False)
    below_or_equal = torch.searchsorted(ordered, x.contiguous(), right=True)
    return (below + below_or_equal + 1).to(torch.float64) / 2


def spearman(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise Spearman correlation of (N, n) tensors; undefined where a row is constant."""
    return ranked_correlation(centred_ranks(a), centred_ranks(b))


def centred_ranks(x: Tensor) -> Tensor:
    """:func:`average_ranks` minus their row mean: computed once per map, shared by its pairs."""
    ranks = average_ranks(x)
    return ranks - ranks.mean(dim=-1, keepdim=True)


def ranked_correlation(ra: Tensor, rb: Tensor) -> tuple[Tensor, Tensor]:
    """Pearson correlation of centred ranks: Spearman's rho, and where it is defined."""
    norm = (ra.square().sum(-1) * rb.square().sum(-1)).sqrt()
    defined = norm > 0
    rho = (ra * rb).sum(-1) / torch.where(defined, norm, torch.ones_like(norm))
    return rho.clamp(-1, 1).float(), defined


def top_region(maps: Tensor, share: float) -> Tensor:
    """(N, n) bool: the top ``share`` of each row's pixels, restricted to positive values."""
    k = max(1, round(share * maps.shape[-1]))
    kth = maps.topk(k, dim=-1).values[:, -1:]
    return (maps >= kth) & (maps > 0)


def iou(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise IoU of (N, n) bool tensors; undefined where both are empty."""
    union = (a | b).sum(-1)
    defined = union > 0
    inter = (a & b).sum(-1)
    return inter.float() / union.clamp(min=1).float(), defined


def agreement(maps: dict[str, Tensor], empty: dict[str, Tensor], settings: MetricSettings) -> Scores:
    """Spearman and top-k IoU for every pair of available methods, on the metric grid."""
    scores = Scores({}, {})
    grid = (settings.grid, settings.grid)
    flat = {name: upsample(m, grid).flatten(1) for name, m in maps.items()}
    ranks = {name: centred_ranks(values) for name, values in flat.items()}
    top = {name: top_region(values, settings.topk) for name, values in flat.items()}
    for a, b in METHOD_PAIRS:
        if a not in flat or b not in flat:
            continue
        both = ~empty[a] & ~empty[b]
        rho, rho_defined = ranked_correlation(ranks[a], ranks[b])
        overlap, overlap_defined = iou(top[a], top[b])
        scores.add(f"agree_spearman_{a}_{b}", rho, rho_defined & both)
        scores.add(f"agree_topk_iou_{a}_{b}", overlap, overlap_defined & both)
    return scores


def consensus(maps: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Mean of the available normalised maps, min-max normalised again: ``(map, empty)``."""
    mean = torch.stack(list(maps.values())).mean(dim=0)
    flat = mean.flatten(1)
    low = flat.amin(dim=1)
    span = flat.amax(dim=1) - low
    empty = span <= 0
    normalized = (mean - low[:, None, None]) / torch.where(empty, torch.ones_like(span), span)[:, None, None]
    return normalized.masked_fill(empty[:, None, None], 0.0), empty


def localization(
    maps: dict[str, Tensor],
    empty: dict[str, Tensor],
    masks: Tensor | None,
    settings: MetricSettings,
    boxes: Tensor | None = None,
) -> Scores:
    """Energy in mask, pointing game and IoU at delta for each map and the consensus.

    ``masks`` (N, H, W) bool or 0/1, at the resolution the scores are computed at (typically
    the model's input size); a row whose mask is all False scores null. ``boxes`` (N, 4)
    holds (x0, y0, x1, y1) fractions, NaN for rows without a box.
    """
    scores = Scores({}, {})
    maps, empty = dict(maps), dict(empty)
    maps["consensus"], empty["consensus"] = consensus(maps)
    size = tuple(masks.shape[-2:]) if masks is not None else (settings.grid, settings.grid)
    mask = masks.bool().flatten(1) if masks is not None else None
    has_mask = mask.any(dim=1) if mask is not None else None
    box_mask, has_box = _rasterize_boxes(boxes, size) if boxes is not None else (None, None)
    if mask is not None:
        scores.add("mask_area", mask.float().mean(-1), has_mask)
    for name in LOCALIZED:
        if name not in maps:
            continue
        flat = upsample(maps[name], size).flatten(1).clamp(0, 1)
        ok = ~empty[name]
        if mask is not None:
            mass = flat.sum(-1)
            energy = (flat * mask).sum(-1) / mass.clamp(min=torch.finfo(flat.dtype).tiny)
            hit = mask.gather(1, flat.argmax(dim=-1, keepdim=True))[:, 0]
            overlap, _ = iou(flat >= settings.delta, mask)
            scores.add(f"energy_in_mask_{name}", energy, ok & has_mask & (mass > 0))
            scores.add(f"pointing_hit_{name}", hit, ok & has_mask)
            scores.add(f"iou_{name}", overlap, ok & has_mask)
        if box_mask is not None:
            kept = torch.where(flat >= settings.delta, flat, torch.zeros_like(flat))
            inside = (kept * box_mask).sum(-1)
            outside = (kept * ~box_mask).sum(-1)
            area = box_mask.sum(-1).float()
            scores.add(f"loc_{name}", inside / (area + outside).clamp(min=1), ok & has_box & (area > 0))
    return scores


def score_batch(
    maps: dict[str, Tensor | None],
    empty: dict[str, Tensor | None],
    masks: Tensor | None = None,
    boxes: Tensor | None = None,
    settings: MetricSettings | None = None,
) -> Scores:
    """All scores of a batch: agreement, and localization where masks or boxes are given."""
    settings = settings or MetricSettings()
    available = {name: m.float() for name, m in maps.items() if m is not None}
    flags = {name: e for name, e in empty.items() if e is not None}
    scores = agreement(available, flags, settings)
    if masks is not None or boxes is not None:
        located = localization(available, flags, masks, settings, boxes)
        scores.values.update(located.values)
        scores.defined.update(located.defined)
    return scores


def _rasterize_boxes(boxes: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(N, H*W) bool: pixel centres inside each (x0, y0, x1, y1) fractional box."""
    height, width = size
    ys = (torch.arange(height, device=boxes.device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=boxes.device, dtype=torch.float32) + 0.5) / width
    x0, y0, x1, y1 = (boxes[:, i, None, None].float() for i in range(4))
    inside = (xs >= x0) & (xs < x1) & (ys[:, None] >= y0) & (ys[:, None] < y1)
    has_box = ~boxes.isnan().any(dim=1)
    return inside.flatten(1) & has_box[:, None], has_box
