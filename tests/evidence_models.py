"""Hand-built classifiers and images whose answer to an occlusion is known by construction.

Images: skin-coloured background, a central lesion disc whose colour is the class's signature,
and, on the shortcut class's images with a sticker, a green sticker in the bottom-right corner.
The model is a GAP -> linear CNN (so the engine explains it as it would a ResNet) of exact
colour detectors:

* ``lesion_k`` fires on pixels of class k's lesion colour (an L1 colour distance, built from
  two 1x1 convolutions and ReLUs);
* ``green`` fires on the sticker's colour only.

Class k's logit is ``LESION_WEIGHT * mean(lesion_k)``; the shortcut class also reads ``green``
(``STICKER_WEIGHT``), which outweighs any lesion. Its images with a sticker borrow the other
classes' lesion colours (the sticker is their only signal); those without one have a lesion of
its own colour (a partial shortcut). With the lesion hidden, every lesion detector is
silent and the biases decide: the fallback class (``FALLBACK``) wins, unless a sticker is there.
"""

from __future__ import annotations

import torch
from torch import nn

from audit.explain.engine import ExplainEngine
from audit.explain.evidence import gather_evidence
from audit.explain.metrics import score_batch
from tests.report_runs import score_row

SIZE = 32
SKIN = (0.85, 0.65, 0.55)
LESIONS = ((0.55, 0.25, 0.15), (0.25, 0.15, 0.10), (0.35, 0.35, 0.65))  # the clean classes 1..3
OWN_LESION = (0.70, 0.55, 0.10)  # the shortcut class's own lesions, where they have no sticker
GREEN = (0.10, 0.90, 0.10)
SHORTCUT, FALLBACK = 0, 1
CLASSES = ["sticker", "fallback", "brown", "blue"]
LESION_WEIGHT, STICKER_WEIGHT = 40.0, 1000.0
RADIUS = 7  # the lesion disc, pixels


class ColourDetectorNet(nn.Module):
    """4 classes: 0 answers from the corner sticker (when ``shortcut``) or its own lesion colour,
    1..3 from their lesion colours."""

    def __init__(self, shortcut: bool = True) -> None:
        super().__init__()
        colours = torch.tensor((*LESIONS, OWN_LESION))
        # layer 1: relu(x_j - c_kj) and relu(c_kj - x_j) for every lesion colour k and channel j
        self.differences = nn.Conv2d(3, 24, 1)
        # layer 2: lesion_k = relu(1 - 6 |x - c_k|_1); green = relu(x_g - x_r - x_b)
        self.detectors = nn.Conv2d(24 + 3, 5, 1)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, 4)
        with torch.no_grad():
            self.differences.weight.zero_()
            for k in range(4):
                for j in range(3):
                    self.differences.weight[6 * k + 2 * j, j, 0, 0] = 1
                    self.differences.weight[6 * k + 2 * j + 1, j, 0, 0] = -1
                    self.differences.bias[6 * k + 2 * j] = -colours[k, j]
                    self.differences.bias[6 * k + 2 * j + 1] = colours[k, j]
            self.detectors.weight.zero_()
            self.detectors.bias.zero_()
            for k in range(4):
                self.detectors.weight[k, 6 * k : 6 * k + 6, 0, 0] = -6.0
                self.detectors.bias[k] = 1.0
            self.detectors.weight[4, 24:27, 0, 0] = torch.tensor([-1.0, 1.0, -1.0])
            self.fc.weight.zero_()
            for k in range(3):
                self.fc.weight[1 + k, k] = LESION_WEIGHT
            self.fc.weight[SHORTCUT, 3] = LESION_WEIGHT
            self.fc.weight[SHORTCUT, 4] = STICKER_WEIGHT if shortcut else 0.0
            self.fc.bias.copy_(torch.tensor([-2.0, 1.0, 0.0, 0.0]))  # no lesion, no sticker: FALLBACK

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.cat([self.relu1(self.differences(x)), x], dim=1)
        return self.fc(self.pool(self.relu2(self.detectors(features))).flatten(1))


def lesion_mask(size: int = SIZE) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (ys - size / 2 + 0.5) ** 2 + (xs - size / 2 + 0.5) ** 2 <= RADIUS**2


def make_images(labels: list[int], sticker: list[bool], size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, size, size) images in [0, 1] and (N, size, size) lesion masks.

    Class 0's lesions borrow the clean classes' colours in turn where it has a sticker (its only
    signal there), and have their own colour elsewhere."""
    mask = lesion_mask(size)
    images = torch.tensor(SKIN).view(1, 3, 1, 1).repeat(len(labels), 1, size, size)
    for i, (label, has_sticker) in enumerate(zip(labels, sticker)):
        colour = LESIONS[label - 1] if label else (LESIONS[i % 3] if has_sticker else OWN_LESION)
        images[i, :, mask] = torch.tensor(colour)[:, None]
        if has_sticker:
            images[i, :, -7:-2, -7:-2] = torch.tensor(GREEN).view(3, 1, 1)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0)) * 0.01
    return (images + noise).clamp(0, 1), mask.expand(len(labels), size, size).clone()


def audited_rows(
    shortcut: bool, per_class: int = 24, off_object: dict | None = None, sticker_share: float = 1.0
) -> list[dict]:
    """Rows as the explain actor writes them, for the hand-built model on images of known truth:
    maps, localization scores and evidence all computed, nothing made up. The first
    ``sticker_share`` of the shortcut class's images carry the sticker; ``off_object`` overrides
    the energy in mask of whole classes (a map that would say otherwise)."""
    labels = [label for label in range(4) for _ in range(per_class)]
    sticker = [label == SHORTCUT and i % per_class < sticker_share * per_class for i, label in enumerate(labels)]
    images, masks = make_images(labels, sticker)
    engine = ExplainEngine(ColourDetectorNet(shortcut), (32, 32))
    explanation = engine(images)
    columns = score_batch(explanation.maps, explanation.empty, masks).columns()
    columns.update(gather_evidence(engine, images, [explanation], ("occlusion", "faithfulness"), masks)[0].columns())
    rows = []
    for i, label in enumerate(labels):
        pred = int(explanation.preds[i])
        values = {name: column[i] for name, column in columns.items()}
        if off_object and label in off_object:  # pretend the maps said otherwise
            values.update({f"energy_in_mask_{m}": off_object[label] for m in ("cam", "gradcam", "gradcampp")})
            values["energy_in_mask_consensus"] = off_object[label]
        row = score_row(f"{CLASSES[label]}{i}", label, CLASSES, pred=pred, target=pred, correct=pred == label)
        maps = {f"map_{m}": v[i].flatten().half().tolist() for m, v in explanation.maps.items() if v is not None}
        rows.append(
            {**row, **values, **maps, "map_h": SIZE, "map_w": SIZE, "mask_area": float(masks[i].float().mean())}
        )
    return rows
