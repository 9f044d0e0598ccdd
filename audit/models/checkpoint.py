"""The checkpoint contract (``cam-audit/1``) and the torchvision models it names.

A checkpoint is one file that ``torch.load(weights_only=True)`` can read: a dict of plain
values and tensors, never a pickled object. Keys: ``format``, ``arch`` (a model spec:
``timm:NAME``, ``torchvision:NAME``, ``package.module:callable``, or a bare torchvision
classification model name as older checkpoints hold), ``classes`` (list of str), ``input_size`` ([h, w]),
``mean`` and ``std`` (3 floats each) and ``state_dict``.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torchvision
from torch import nn

from audit.errors import CheckpointError, first_line

CHECKPOINT_FORMAT = "cam-audit/1"
_REQUIRED_KEYS = ("format", "arch", "classes", "input_size", "mean", "std", "state_dict")


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint: everything needed to rebuild the model and preprocess its input."""

    arch: str
    classes: tuple[str, ...]
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    state_dict: Mapping[str, torch.Tensor]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "arch": self.arch,
            "classes": list(self.classes),
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "state_dict": dict(self.state_dict),
        }


@cache
def classification_architectures() -> frozenset[str]:
    """Names of torchvision's image classification models (detection, video, ... excluded)."""
    return frozenset(torchvision.models.list_models(module=torchvision.models))


def parse_arch(arch: str) -> tuple[str, str]:
    """``(kind, name)`` of a checkpoint's ``arch``: ``timm``, ``torchvision`` or ``module``."""
    kind, sep, name = arch.partition(":")
    if sep and kind in ("timm", "torchvision"):
        return kind, name
    if sep:
        return "module", arch
    return "torchvision", arch


def build_model(arch: str, num_classes: int | None, input_size: tuple[int, int] | None = None) -> nn.Module:
    """The architecture ``arch`` names with ``num_classes`` outputs (its default when None) and
    random weights. A module spec's callable decides its own outputs. ``input_size`` reaches the
    architectures that fix it at construction (ViTs)."""
    kind, name = parse_arch(arch)
    if num_classes is not None and num_classes < 1:
        raise CheckpointError(f"a classifier needs at least one class, got {num_classes}")
    if kind == "timm":
        return _timm_model(name, num_classes, input_size)
    if kind == "module":
        return _module_model(name)
    return _torchvision_model(name, num_classes, input_size)


def _torchvision_model(name: str, num_classes: int | None, input_size: tuple[int, int] | None) -> nn.Module:
    if name not in classification_architectures():
        close = difflib.get_close_matches(name, sorted(classification_architectures()), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " such as resnet50, densenet121 or efficientnet_b0"
        raise CheckpointError(f"unknown architecture {name!r}: expected a torchvision classification model{hint}")
    kwargs: dict = {} if num_classes is None else {"num_classes": num_classes}
    if name.startswith("vit_") and input_size is not None:
        kwargs["image_size"] = input_size[0]  # torchvision's ViT fixes its (square) input at construction
    try:
        return torchvision.models.get_model(name, weights=None, **kwargs)
    except (AssertionError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot build torchvision:{name}: {first_line(exc)}") from exc


def _timm_model(name: str, num_classes: int | None, input_size: tuple[int, int] | None) -> nn.Module:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise CheckpointError(f"unknown timm model {name!r}{hint}")
    kwargs: dict = {} if num_classes is None else {"num_classes": num_classes}
    default = timm.get_pretrained_cfg(name)
    default_size = tuple(getattr(default, "input_size", (3, 224, 224))[1:]) if default else (224, 224)
    try:
        if input_size is not None and tuple(input_size) != default_size:
            try:  # transformers fix their patch grid at construction; CNNs take any size
                return timm.create_model(name, pretrained=False, img_size=tuple(input_size), **kwargs)
            except TypeError:
                pass
        return timm.create_model(name, pretrained=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - timm raises many kinds for a bad configuration
        raise CheckpointError(f"cannot build timm:{name}: {first_line(exc)}") from exc


def _module_model(spec: str) -> nn.Module:
    from audit.models.source import import_factory

    factory = import_factory(spec)
    try:
        model = factory()
    except Exception as exc:  # noqa: BLE001 - the team's code may fail in any way
        raise CheckpointError(f"{spec}() failed: {first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{spec}() returned a {type(model).__name__}, not a torch nn.Module")
    return model


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    arch: str,
    classes: Sequence[str],
    input_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
) -> Checkpoint:
    """Write ``model`` as a cam-audit checkpoint and return what was written."""
    checkpoint = validated_checkpoint(
        {
            "format": CHECKPOINT_FORMAT,
            "arch": arch,
            "classes": list(classes),
            "input_size": list(input_size),
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        },
        source=str(path),
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint.to_dict(), path)
    return checkpoint


def save_random_checkpoint(
    path: str | Path, arch: str, classes: Sequence[str], input_size: tuple[int, int], seed: int = 0
) -> Checkpoint:
    """A randomly initialised ``arch`` saved as a checkpoint (benchmarks and tests: no weights needed)."""
    torch.manual_seed(seed)
    model = build_model(arch, len(classes), input_size)
    return save_checkpoint(
        path, model, arch=arch, classes=classes, input_size=input_size, mean=(0.5,) * 3, std=(0.25,) * 3
    )


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate a checkpoint file without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return _read(path, str(path))


def checkpoint_from_bytes(data: bytes, source: str = "checkpoint") -> Checkpoint:
    """The same as :func:`load_checkpoint`, from the file's bytes (as shipped to Ray actors)."""
    return _read(io.BytesIO(data), source)


def _read(file: Path | io.BytesIO, source: str) -> Checkpoint:
    try:
        raw = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        smuggled = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if smuggled is None:
            raise CheckpointError(f"{source}: not a readable torch checkpoint") from exc
        raise CheckpointError(
            f"{source}: refused to load: it holds a pickled {smuggled.group(1)} object; only tensors and "
            f"plain values are accepted (the {CHECKPOINT_FORMAT} format, read with weights_only=True)"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{source}: not a readable torch checkpoint ({exc})") from exc
    return validated_checkpoint(raw, source=source)


def load_model(checkpoint: Checkpoint) -> nn.Module:
    """Rebuild the checkpoint's model with its weights, in eval mode."""
    model = build_model(checkpoint.arch, checkpoint.num_classes, checkpoint.input_size)
    try:
        model.load_state_dict(checkpoint.state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"the weights do not fit {checkpoint.arch} with {checkpoint.num_classes} classes: "
            f"{state_dict_mismatch(model.state_dict(), checkpoint.state_dict)}"
        ) from exc
    return model.eval()


def state_dict_mismatch(wanted: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str:
    """One line on how ``given`` differs from what a model ``wanted``: missing, unexpected and reshaped keys."""
    missing = [k for k in wanted if k not in given]
    unexpected = [k for k in given if k not in wanted]
    reshaped = [k for k in wanted if k in given and tuple(wanted[k].shape) != tuple(given[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if reshaped:
        key = reshaped[0]
        shape = "x".join(map(str, given[key].shape)), "x".join(map(str, wanted[key].shape))
        parts.append(f"{len(reshaped)} of another shape (e.g. {key}: {shape[0]} in the file, {shape[1]} in the model)")
    return "; ".join(parts) or "the state dict does not load"


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def validated_checkpoint(raw: object, source: str) -> Checkpoint:
    """``raw`` as a Checkpoint, or a CheckpointError naming what is wrong."""
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{source}: expected a dict in the {CHECKPOINT_FORMAT} format, got {type(raw).__name__}")
    missing = [key for key in _REQUIRED_KEYS if key not in raw]
    if missing:
        hint = " (a bare state_dict? save it with audit.models.save_checkpoint)" if "format" in missing else ""
        raise CheckpointError(f"{source}: missing keys {', '.join(missing)}{hint}")
    if raw["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{source}: format {raw['format']!r} is not supported, expected {CHECKPOINT_FORMAT!r}")
    classes = raw["classes"]
    if not (isinstance(classes, Sequence) and classes and all(isinstance(c, str) and c for c in classes)):
        raise CheckpointError(f"{source}: 'classes' must be a non-empty list of class names")
    if len(set(classes)) != len(classes):
        raise CheckpointError(f"{source}: 'classes' has duplicate names")
    if not isinstance(raw["arch"], str):
        raise CheckpointError(f"{source}: 'arch' must be a model spec such as resnet50 or timm:efficientnet_b0")
    return Checkpoint(
        arch=raw["arch"],
        classes=tuple(classes),
        input_size=_int_pair(raw["input_size"], "input_size", source),
        mean=_float_triple(raw["mean"], "mean", source),
        std=_float_triple(raw["std"], "std", source, positive=True),
        state_dict=_state_dict(raw["state_dict"], source),
    )


def _int_pair(value: object, key: str, source: str) -> tuple[int, int]:
    if not (isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)):
        raise CheckpointError(f"{source}: {key!r} must be [height, width] in pixels, got {value!r}")
    return int(value[0]), int(value[1])


def _float_triple(value: object, key: str, source: str, positive: bool = False) -> tuple[float, float, float]:
    ok = isinstance(value, Sequence) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)
    if not ok or (positive and any(v <= 0 for v in value)):
        rule = "3 positive numbers" if positive else "3 numbers"
        raise CheckpointError(f"{source}: {key!r} must be {rule} (one per RGB channel), got {value!r}")
    return float(value[0]), float(value[1]), float(value[2])


def _state_dict(value: object, source: str) -> Mapping[str, torch.Tensor]:
    if not (isinstance(value, Mapping) and all(isinstance(v, torch.Tensor) for v in value.values())):
        raise CheckpointError(f"{source}: 'state_dict' must map parameter names to tensors")
    return value
