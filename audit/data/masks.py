"""Estimated lesion masks, for datasets that ship none (``mask_source = estimated``).

Classical segmentation with scikit-image, the usual baseline for dermoscopy: a lesion differs
in colour from the skin around it.

1. Estimate the skin colour as the median CIELAB colour of a frame along the image border
   (near-black pixels excluded: dermoscope corners), and smooth (Gaussian) each pixel's CIELAB distance to it;
2. threshold that distance with Otsu's method;
3. clean up with a binary opening and drop specks;
4. keep the connected component that best fits a lesion: large, near the centre, and not
   spread along the image border (dark dermoscope corners and rulers touch the border),
   and fill its holes.

An image whose threshold finds no such component gets an empty mask: its localization
scores are then null rather than measured against a guess.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import color, filters, measure, morphology


def estimate_lesion_mask(rgb: np.ndarray) -> np.ndarray:
    """Bool (H, W) lesion mask for an RGB uint8 image."""
    lab = color.rgb2lab(rgb)
    h, w = rgb.shape[:2]
    frame = np.ones((h, w), dtype=bool)
    frame[h // 8 : h - h // 8, w // 8 : w - w // 8] = False
    border = lab[frame]
    lit = border[border[:, 0] > 25]  # a dermoscope's black corners are not skin
    skin = np.median(lit if len(lit) else border, axis=0)
    signal = filters.gaussian(np.linalg.norm(lab - skin, axis=-1), sigma=max(1.0, min(h, w) / 100))
    if np.ptp(signal) < 1e-6:
        return np.zeros(rgb.shape[:2], dtype=bool)
    candidate = signal > filters.threshold_otsu(signal)
    radius = max(1, min(rgb.shape[:2]) // 100)
    candidate = morphology.opening(candidate, morphology.disk(radius))
    candidate = morphology.remove_small_objects(candidate, max_size=max(16, candidate.size // 500))
    # Holes are filled in the chosen component only: a dermoscope's dark ring would otherwise
    # enclose, and fill, the whole field of view.
    return ndimage.binary_fill_holes(_most_lesion_like(candidate))


def _most_lesion_like(candidate: np.ndarray) -> np.ndarray:
    labels = measure.label(candidate)
    h, w = candidate.shape
    best, best_score = 0, 0.0
    for region in measure.regionprops(labels):
        cy, cx = region.centroid
        off_centre = np.hypot((cy - h / 2) / (h / 2), (cx - w / 2) / (w / 2)) / np.sqrt(2)
        rows, cols = np.nonzero(labels == region.label)
        border_share = np.mean((rows == 0) | (rows == h - 1) | (cols == 0) | (cols == w - 1))
        touches = (rows.min() == 0) + (rows.max() == h - 1) + (cols.min() == 0) + (cols.max() == w - 1)
        score = region.area * (1 - off_centre) * (1 - min(1.0, 20 * border_share)) / (1 + touches)
        if score > best_score:
            best, best_score = region.label, score
    return labels == best if best else np.zeros_like(candidate)


def mask_iou(estimated: np.ndarray, truth: np.ndarray) -> float | None:
    """IoU of two bool masks; None when both are empty."""
    union = np.logical_or(estimated, truth).sum()
    return None if union == 0 else float(np.logical_and(estimated, truth).sum() / union)
