"""Pictures for the HTML report, as data URIs: matplotlib plots (PNG) and image thumbnails (JPEG).

Plots are drawn on a bare :class:`matplotlib.figure.Figure` (no pyplot, no global state, no
display). Thumbnails are about ``THUMB_PX`` on their long side, JPEG at moderate quality:
a gallery card of four of them weighs some 30 KB in the file.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image
from skimage.segmentation import find_boundaries

from audit.explain.methods import METHODS

THUMB_PX = 200
JPEG_QUALITY = 70
METHOD_TITLES = {
    "cam": "CAM",
    "gradcam": "Grad-CAM",
    "gradcampp": "Grad-CAM++",
    "consensus": "consensus",
    "guided-gradcam": "Guided Grad-CAM",
    "guided-gradcampp": "Guided Grad-CAM++",
}
_COLORS = {
    "cam": "#1b9e77",
    "gradcam": "#d95f02",
    "gradcampp": "#7570b3",
    "consensus": "#222222",
    "guided-gradcam": "#e6ab02",
    "guided-gradcampp": "#e7298a",
}
_PAIR_COLORS = {"cam_gradcam": "#1b9e77", "cam_gradcampp": "#d95f02", "gradcam_gradcampp": "#7570b3"}


KIND_TITLES = {"off_object": "off-object", "low_agreement": "low agreement", "context_reliance": "context reliance"}


def kind_title(kind: str) -> str:
    """``off_object`` -> off-object, ``context_reliance`` -> context reliance."""
    return KIND_TITLES.get(kind, kind.replace("_", " "))


def method_title(method: str) -> str:
    """``gradcam`` -> Grad-CAM, ``cam_gradcampp`` -> CAM vs Grad-CAM++, ``all`` -> all counted pairs."""
    if method == "all":
        return "all counted pairs"
    if "_" in method and method not in METHOD_TITLES:
        a, b = method.split("_")
        return f"{METHOD_TITLES[a]} vs {METHOD_TITLES[b]}"
    return METHOD_TITLES.get(method, method)


@dataclass(frozen=True)
class Picture:
    """An embeddable image: ``<img src=uri width=width height=height>``."""

    uri: str
    width: int
    height: int


def histograms(
    agreement: dict[str, np.ndarray], energy: dict[str, np.ndarray], agreement_min: float, energy_min: float
) -> Picture:
    """Left: Spearman agreement per method pair; right: energy in mask per method. Dashed: thresholds."""
    figure = Figure(figsize=(8.4, 2.5), dpi=90, layout="constrained")
    left, right = figure.subplots(1, 2)
    for pair, values in agreement.items():
        a, b = pair.split("_")
        label = f"{METHOD_TITLES[a]} vs {METHOD_TITLES[b]}"
        _step(left, values, (-1, 1), _PAIR_COLORS[pair], label)
    left.axvline(agreement_min, color="#c00", linestyle="--", linewidth=1)
    left.set_xlabel("Spearman agreement (dashed: low below)")
    for method, values in energy.items():
        _step(right, values, (0, 1), _COLORS[method], METHOD_TITLES[method])
    right.axvline(energy_min, color="#c00", linestyle="--", linewidth=1)
    right.set_xlabel("energy in mask (dashed: energy_min)")
    for axes in (left, right):
        axes.set_ylabel("images")
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=7, frameon=False, loc="best")
        axes.spines[["top", "right"]].set_visible(False)
    return _png(figure)


def sanity_plot(steps: list[dict]) -> Picture:
    """Similarity of each method's maps to the trained model's against the cumulative randomization
    step (Adebayo et al.'s cascading randomization figure); the trained model sits at 1."""
    figure = Figure(figsize=(6.4, 2.8), dpi=90, layout="constrained")
    axes = figure.subplots()
    labels = ["trained"] + [step["randomized"][-1] for step in steps]
    methods = [m for m in METHOD_TITLES if any(step["similarity"].get(m) is not None for step in steps)]
    for method in methods:
        values = [1.0] + [step["similarity"].get(method) for step in steps]
        xs = [i for i, v in enumerate(values) if v is not None]
        style = "--" if method.startswith("guided") else "-"
        axes.plot(xs, [values[i] for i in xs], style, marker="o", color=_COLORS[method], label=METHOD_TITLES[method])
    axes.axhline(0, color="#999", linewidth=0.8)
    axes.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8, ha="right")
    axes.set_ylim(-1.05, 1.05)
    axes.set_ylabel("median Spearman vs trained")
    axes.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1, 0.5))
    axes.spines[["top", "right"]].set_visible(False)
    return _png(figure)


def mean_heatmaps(means: dict[str, np.ndarray], counts: int, input_size: tuple[int, int]) -> Picture:
    """Class-mean map of each method stretched over the model's input frame (image coordinates):
    a bright corner or edge shared by the class is a systematic shortcut."""
    h, w = input_size
    figure = Figure(figsize=(8.4, 2.9 * h / w + 0.4), dpi=90, layout="constrained")
    panels = figure.subplots(1, len(METHODS))
    for axes, method in zip(panels, METHODS):
        mean = means.get(method)
        axes.set_xticks([])
        axes.set_yticks([])
        axes.set_title(METHOD_TITLES[method], fontsize=9)
        if mean is None:
            axes.text(0.5, 0.5, "no map", ha="center", va="center", transform=axes.transAxes)
            continue
        shown = axes.imshow(mean, cmap="jet", vmin=0, vmax=1, extent=(0, w, h, 0), interpolation="bilinear")
    if any(m in means for m in METHODS):
        figure.colorbar(shown, ax=panels, shrink=0.8, label=f"mean over {counts} images")
    return _png(figure)


CLUSTER_COLORS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666")


def cluster_color(index: int) -> str:
    """One colour per strategy cluster (index 0, 1, ...), grey for the pooled "other" (-1)."""
    return CLUSTER_COLORS[-1] if index < 0 else CLUSTER_COLORS[index % (len(CLUSTER_COLORS) - 1)]


def strategy_panel(
    clusters: list[tuple[int, str, np.ndarray]],
    input_size: tuple[int, int],
    embedding: np.ndarray,
    embedded_labels: np.ndarray,
) -> Picture:
    """The strategy clusters of a class: each cluster's mean map in the model's input frame, titled
    with its number, region and share, then the class's maps in 2-D (the first two non-trivial
    eigenvectors of the clustering's graph), coloured by cluster."""
    h, w = input_size
    count = len(clusters)
    figure = Figure(figsize=(2.0 * count + 2.6, 2.0 * h / w + 0.7), dpi=90, layout="constrained")
    panels = np.atleast_1d(figure.subplots(1, count + 1, width_ratios=[1] * count + [1.3]))
    for axes, (index, title, mean) in zip(panels, clusters):
        axes.imshow(mean, cmap="jet", vmin=0, vmax=max(float(mean.max()), 1e-6), extent=(0, w, h, 0))
        axes.set_xticks([])
        axes.set_yticks([])
        axes.set_title(title, fontsize=8, color=cluster_color(index))
    scatter = panels[-1]
    for index in sorted(set(embedded_labels.tolist())):
        chosen = embedded_labels == index
        scatter.scatter(
            *embedding[chosen].T, s=7, color=cluster_color(index), label="other" if index < 0 else index + 1
        )
    scatter.set_xticks([])
    scatter.set_yticks([])
    scatter.set_title("maps in 2-D (spectral embedding)", fontsize=8)
    scatter.legend(fontsize=7, markerscale=1.5, loc="best")
    return _png(figure)


def thumbnail(rgb: np.ndarray, size: int = THUMB_PX) -> np.ndarray:
    """The image resized so that its long side is ``size`` pixels."""
    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    resized = Image.fromarray(rgb).resize(
        (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS
    )
    return np.asarray(resized)


def overlay(rgb: np.ndarray, saliency: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """The map upsampled bilinearly to the image and blended on it with the jet colour map."""
    h, w = rgb.shape[:2]
    upsampled = np.asarray(Image.fromarray(saliency.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR))
    heat = colormaps["jet"](np.clip(upsampled, 0, 1))[..., :3] * 255
    return ((1 - weight) * rgb + weight * heat).astype(np.uint8)


def guided_picture(guided: np.ndarray, thumb: np.ndarray) -> np.ndarray:
    """A guided map (H, W, 3) in the model's frame, shown as pytorch-grad-cam shows it (grey where
    nothing flows) and stretched back to the thumbnail's size, like the overlays."""
    import torch

    from audit.explain.guided import display

    shown = (display(torch.from_numpy(guided)).numpy() * 255).round().astype(np.uint8)
    h, w = thumb.shape[:2]
    return np.asarray(Image.fromarray(shown).resize((w, h), Image.Resampling.BILINEAR))


def outline(rgb: np.ndarray, mask: np.ndarray | None, color: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """The image with the object mask's contour drawn on it (unchanged when there is no mask)."""
    if mask is None or not mask.any():
        return rgb
    h, w = rgb.shape[:2]
    if mask.shape != (h, w):
        mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.Resampling.NEAREST))
    drawn = rgb.copy()
    drawn[find_boundaries(mask, mode="thick")] = color
    return drawn


def box_mask(shape: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    """A bool mask of a box given as fractions (x0, y0, x1, y1) of the image."""
    h, w = shape
    x0, y0, x1, y1 = box
    mask = np.zeros(shape, dtype=bool)
    mask[
        int(y0 * h) : max(int(y0 * h) + 1, int(round(y1 * h))), int(x0 * w) : max(int(x0 * w) + 1, int(round(x1 * w)))
    ] = True
    return mask


def jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> Picture:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality, optimize=True)
    h, w = rgb.shape[:2]
    return Picture(_uri("image/jpeg", buffer.getvalue()), w, h)


def _step(axes, values: np.ndarray, value_range: tuple[float, float], color: str, label: str) -> None:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if len(values):
        axes.hist(values, bins=20, range=value_range, histtype="step", color=color, label=label, linewidth=1.4)


def _png(figure: Figure) -> Picture:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    width, height = Image.open(buffer).size  # as saved: the figure's inches x dpi, rounded by the backend
    return Picture(_uri("image/png", buffer.getvalue()), width, height)


def _uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
