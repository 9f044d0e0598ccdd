"""`audit explain`: a one-off look at a few images, with the same engine and preprocessing as a run.

Each image is decoded by the run's robust decoder, resized to the model's input without
cropping, and explained for one target (the predicted class, the label its folder names, or a
class given by name or index). Per image it writes ``<stem>.png``: the image as the model sees it,
then one overlay per method, the class and its probability in the caption; with ``npy``, one
``<stem>.<method>.npy`` per method at the model's input resolution: (H, W) float32 in [0, 1] for
CAM, Grad-CAM and Grad-CAM++ (the map upsampled bilinearly), (H, W, 3) float32 for Guided
Grad-CAM and Guided Grad-CAM++ (:mod:`audit.explain.guided`, unnormalised). Everything is
checked (images, methods, target) before anything is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure

from audit.data.decode import DecodeError, decode_image, resize_rgb
from audit.errors import AuditError
from audit.explain.engine import ExplainEngine
from audit.explain.guided import GUIDED, GuidedBackprop, display, guided_maps, guided_note
from audit.explain.methods import METHODS
from audit.explain.metrics import upsample
from audit.models.source import ModelRequest, resolve_model
from audit.report.figures import METHOD_TITLES

LOOK_METHODS = (*METHODS, *GUIDED)


class ExplainInputError(AuditError):
    """An image, method or target that `audit explain` cannot use."""


@dataclass
class Look:
    """One image explained: ``maps[m]`` at the input resolution, as the ``.npy`` files hold them."""

    path: Path
    pixels: np.ndarray  # (H, W, 3) uint8, the image as the model sees it
    target: int
    target_name: str
    target_kind: str
    probability: float
    predicted: str
    maps: dict[str, np.ndarray]


def parse_methods(text: str | None) -> tuple[str, ...] | None:
    """``"cam,guided-gradcampp"`` -> the methods, checked; None means every method the model has."""
    if text is None:
        return None
    methods = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in methods if m not in LOOK_METHODS]
    if unknown or not methods:
        raise ExplainInputError(
            f"unknown method {unknown[0] if unknown else '(none)'!r}: choose from {', '.join(LOOK_METHODS)}"
        )
    return methods


def resolve_target(spec: str, classes: tuple[str, ...], path: Path) -> tuple[int | None, str]:
    """``pred`` -> (None, "pred"); ``label`` -> the class the image's folder names; a class name or index."""
    if spec == "pred":
        return None, "pred"
    if spec == "label":
        if path.parent.name not in classes:
            raise ExplainInputError(
                f"--target label: {path} is not in a folder named after one of the model's classes "
                f"({', '.join(classes)})"
            )
        return classes.index(path.parent.name), "label"
    if spec in classes:
        return classes.index(spec), "class"
    if spec.isdigit() and int(spec) < len(classes):
        return int(spec), "class"
    raise ExplainInputError(f"--target {spec!r}: expected pred, label, a class name ({', '.join(classes)}) or an index")


def explain_images(
    request: ModelRequest,
    paths: list[Path],
    target: str = "pred",
    methods: tuple[str, ...] | None = None,
    target_layer: str | None = None,
    device: str | None = None,
) -> list[Look]:
    """Explain ``paths`` with ``methods`` (default: all the model has) by the model ``request`` names;
    raises before any compute on bad input."""
    resolved = resolve_model(request)
    checkpoint, model = resolved.checkpoint, resolved.model
    paths = [Path(p) for p in paths]
    _unique_stems(paths)
    pixels = np.stack([_load(path, checkpoint.input_size) for path in paths])
    targets = [resolve_target(target, checkpoint.classes, path) for path in paths]
    chosen = _available(model, methods)
    run_on = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(run_on)
    engine = ExplainEngine(
        model,
        checkpoint.input_size,
        target_layer=target_layer,
        autocast_dtype=torch.bfloat16 if run_on.type == "cuda" else None,
    )
    if "cam" in chosen and engine.anatomy.cam_head is None:
        if methods is not None:
            raise ExplainInputError(f"cam: {engine.anatomy.cam_note}")
        chosen = tuple(m for m in chosen if m != "cam")
    mean = torch.tensor(checkpoint.mean, device=run_on).view(1, 3, 1, 1)
    std = torch.tensor(checkpoint.std, device=run_on).view(1, 3, 1, 1)
    images = (torch.from_numpy(pixels).to(run_on).permute(0, 3, 1, 2).float() / 255 - mean) / std
    wanted = None if targets[0][0] is None else torch.tensor([t for t, _ in targets], device=run_on)
    explained = engine(images, wanted)
    size = checkpoint.input_size
    maps = {m: upsample(explained.maps[m], size) for m in METHODS if m in chosen}
    if any(m in GUIDED for m in chosen):
        gradients = GuidedBackprop(model)(images, explained.targets)
        maps.update({m: v for m, v in guided_maps(gradients, explained.maps).items() if m in chosen})
    looks = []
    for i, path in enumerate(paths):
        index = int(explained.targets[i])
        looks.append(
            Look(
                path=path,
                pixels=pixels[i],
                target=index,
                target_name=checkpoint.classes[index],
                target_kind=targets[i][1],
                probability=float(explained.probs[i, index]),
                predicted=checkpoint.classes[int(explained.preds[i])],
                maps={m: maps[m][i].float().cpu().numpy().astype(np.float32) for m in chosen},
            )
        )
    return looks


def write_looks(looks: list[Look], out: Path, npy: bool = False) -> list[Path]:
    """``<stem>.png`` per image (and ``<stem>.<method>.npy`` with ``npy``); returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for look in looks:
        stem = look.path.stem
        written.append(
            _atomic(out / f"{stem}.png", lambda handle, look=look: _figure(look).savefig(handle, format="png"))
        )
        if npy:
            for method, values in look.maps.items():
                written.append(
                    _atomic(
                        out / f"{stem}.{method}.npy", lambda handle, v=values: np.save(handle, v, allow_pickle=False)
                    )
                )
    return written


def _figure(look: Look) -> Figure:
    count = 1 + len(look.maps)
    h, w = look.pixels.shape[:2]
    figure = Figure(figsize=(2.4 * count, 2.4 * h / w + 0.6), dpi=100, layout="constrained")
    panels = np.atleast_1d(figure.subplots(1, count))
    panels[0].imshow(look.pixels)
    panels[0].set_title("image", fontsize=9)
    for axes, (method, values) in zip(panels[1:], look.maps.items()):
        if method in GUIDED:
            axes.imshow(display(torch.from_numpy(values)).numpy())
        else:
            heat = colormaps["jet"](np.clip(values, 0, 1))[..., :3]
            axes.imshow((0.5 * look.pixels / 255 + 0.5 * heat).clip(0, 1))
        axes.set_title(METHOD_TITLES[method], fontsize=9)
    for axes in panels:
        axes.set_xticks([])
        axes.set_yticks([])
    kind = {"pred": "predicted", "label": "label", "class": "chosen"}[look.target_kind]
    predicted = "" if look.target_kind == "pred" else f"; predicted {look.predicted}"
    figure.suptitle(f"{look.path.name}: {look.target_name} ({kind}), p = {look.probability:.2f}{predicted}", fontsize=9)
    return figure


def _load(path: Path, size: tuple[int, int]) -> np.ndarray:
    if not path.is_file():
        raise ExplainInputError(f"{path}: no such image file")
    try:
        return resize_rgb(decode_image(path), size)
    except DecodeError as exc:
        raise ExplainInputError(f"{path}: {exc}") from None


def _unique_stems(paths: list[Path]) -> None:
    seen: dict[str, Path] = {}
    for path in paths:
        if path.stem in seen:
            raise ExplainInputError(
                f"{seen[path.stem]} and {path} would write the same {path.stem}.png; explain them apart"
            )
        seen[path.stem] = path


def _available(model: torch.nn.Module, methods: tuple[str, ...] | None) -> tuple[str, ...]:
    """The methods to compute: those asked for (an unavailable one is an error), else all the model has."""
    note = guided_note(model)
    if methods is None:
        return tuple(m for m in LOOK_METHODS if not (note and m in GUIDED))
    if note and any(m in GUIDED for m in methods):
        raise ExplainInputError(f"{next(m for m in methods if m in GUIDED)}: {note}")
    return methods


def _atomic(path: Path, write) -> Path:
    partial = path.with_name(f".{path.name}.tmp")
    with open(partial, "wb") as handle:
        write(handle)
    os.replace(partial, path)
    return path
