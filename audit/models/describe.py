"""`audit model inspect`: what an audit of a model will do, before any data is read.

The model is resolved exactly as `audit run` resolves it (:func:`audit.models.source.resolve_model`)
and probed exactly as the explain actors probe it (:func:`audit.models.anatomy.inspect_model`), so
the target layer, layout, grid and CAM verdict printed here are the run's.
"""

from __future__ import annotations

from audit.models.anatomy import inspect_model
from audit.models.source import ModelRequest, resolve_model

OTHER_LAYERS = 8  # candidates listed besides the choice


def describe_model(request: ModelRequest, target_layer: str | None = None, classifier: str | None = None) -> dict:
    """The model's source, size, preprocessing, target layer with its layout and grid, CAM, and other layers."""
    resolved = resolve_model(request)
    checkpoint = resolved.checkpoint
    anatomy = inspect_model(resolved.model, checkpoint.input_size, target_layer, classifier)
    layout = anatomy.layout
    others = [c for c in anatomy.candidates if c.name != anatomy.target_layer][:OTHER_LAYERS]
    return {
        "spec": request.spec,
        "source": request.kind,
        "architecture": type(resolved.model).__name__,
        "parameters": sum(p.numel() for p in resolved.model.parameters()),
        "weights": request.weights or ("the checkpoint's" if request.kind == "checkpoint" else "random"),
        "sha256": resolved.sha256,
        "classes": len(checkpoint.classes),
        "input_size": list(checkpoint.input_size),
        "mean": list(checkpoint.mean),
        "std": list(checkpoint.std),
        "target_layer": anatomy.target_layer,
        "layout": layout.kind,
        "grid": list(layout.grid),
        "channels": layout.channels,
        "prefix_tokens": layout.prefix_tokens,
        "cam": anatomy.cam_head is not None,
        "cam_head": anatomy.cam_head.name if anatomy.cam_head else None,
        "cam_note": anatomy.cam_note,
        "gradcam_proportional_to_cam": anatomy.gradcam_proportional_to_cam,
        "finer_layer": list(anatomy.finer_layer) if anatomy.finer_layer else None,
        "candidates": [
            {"name": c.name, "layout": c.layout.kind, "grid": list(c.layout.grid), "channels": c.layout.channels}
            for c in others
        ],
    }


def format_description(found: dict) -> str:
    """The description as aligned lines for a terminal."""
    h, w = found["input_size"]
    grid = "x".join(map(str, found["grid"]))
    prefix = f", after {found['prefix_tokens']} prefix token(s)" if found["prefix_tokens"] else ""
    cam = f"yes, read by {found['cam_head']}" if found["cam"] else f"no: {found['cam_note']}"
    lines = [
        ("model", f"{found['spec']} ({found['architecture']}, {found['parameters']:,} parameters)"),
        ("weights", found["weights"]),
        ("classes", str(found["classes"])),
        ("input", f"{h}x{w}, mean {_numbers(found['mean'])}, std {_numbers(found['std'])}"),
        ("target layer", found["target_layer"]),
        ("layout", f"{found['layout']}: {grid} grid of {found['channels']} channels{prefix}"),
        ("CAM", cam),
    ]
    if found["finer_layer"]:
        name, fh, fw = found["finer_layer"]
        lines.append(("finer layer", f"{name} ({fh}x{fw}): the maps at {grid} are coarse for small objects"))
    width = max(len(label) for label, _ in lines)
    out = [f"{label:<{width}}  {value}" for label, value in lines]
    if found["candidates"]:
        out.append("other layers (--target-layer):")
        out += [
            f"  {c['name']}  {c['layout']} {'x'.join(map(str, c['grid']))} x {c['channels']}"
            for c in found["candidates"]
        ]
    return "\n".join(out)


def _numbers(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"
