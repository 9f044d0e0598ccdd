"""Guided Grad-CAM and Guided Grad-CAM++ for the report's gallery images only.

They need the model (a full backward per image), which the report stage otherwise never loads:
the run's model is resolved again from run.json's model options and used only when its sha256
is the run's. The images are preprocessed as the run did (resize without cropping, the checkpoint's
normalisation) and explained for the row's own target at the run's target layer. Where the model
cannot be had (moved, changed, no ReLU to guide), the gallery shows the coarse maps and the report
says why.
"""

from __future__ import annotations

import numpy as np

from audit.errors import AuditError

CHUNK = 16


def load_run_model(info: dict):
    """``(checkpoint, model)`` of a run, or ``(None, reason)`` when it cannot be used."""
    from audit.config import RunConfig
    from audit.models.source import resolve_model

    model_info = info.get("model", {})
    try:
        config = RunConfig.from_dict(info.get("config", {}))
        resolved = resolve_model(config.model_request(), model_info.get("classes"))
    except AuditError as exc:
        return None, f"the run's model cannot be loaded: {exc}"
    if resolved.sha256 != model_info.get("sha256"):
        return None, f"{config.model} changed since the run (sha256 differs)"
    return resolved.checkpoint, resolved.model


def gallery_guided(info: dict, images: list[np.ndarray], targets: list[int]) -> tuple[dict[str, list], str | None]:
    """Guided maps ((H, W, 3) float32 at the model's input size) of each RGB image for its target:
    ``({method: [map, ...]}, None)``, or ``({}, reason)`` when the model cannot be used."""
    import torch

    from audit.data.decode import resize_rgb
    from audit.explain.engine import ExplainEngine
    from audit.explain.guided import GuidedBackprop, guided_maps, guided_note

    if not images:
        return {}, None
    checkpoint, model = load_run_model(info)
    if checkpoint is None:
        return {}, model
    note = guided_note(model)
    if note:
        return {}, note
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    engine = ExplainEngine(model, checkpoint.input_size, target_layer=info["model"].get("target_layer"))
    guided = GuidedBackprop(model)
    mean = torch.tensor(checkpoint.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(checkpoint.std, device=device).view(1, 3, 1, 1)
    out: dict[str, list] = {}
    for start in range(0, len(images), CHUNK):
        pixels = np.stack([resize_rgb(rgb, checkpoint.input_size) for rgb in images[start : start + CHUNK]])
        batch = (torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float() / 255 - mean) / std
        wanted = torch.tensor(targets[start : start + CHUNK], device=device)
        explained = engine(batch, wanted)
        for name, maps in guided_maps(guided(batch, wanted), explained.maps).items():
            if maps is not None:
                out.setdefault(name, []).extend(m.float().cpu().numpy() for m in maps)
    return out, None
