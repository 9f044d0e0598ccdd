"""Where a model comes from: one spec for a cam-audit checkpoint, timm, torchvision or the team's own code.

``--model SPEC`` takes one of:

* a path to a cam-audit checkpoint file (:mod:`audit.models.checkpoint`); ``--checkpoint FILE``
  is the same;
* ``timm:NAME`` or ``torchvision:NAME``: the architecture, built with as many outputs as there
  are classes; its weights from ``--weights FILE`` (``.safetensors``, or a ``.pt``/``.pth`` state
  dict read with ``weights_only=True``; a checkpoint's ``state_dict`` or ``model`` entry is
  accepted), random (seed 0) without;
* ``package.module:callable``: the team's own code, imported from the current directory and
  PYTHONPATH, called with no arguments and returning an ``nn.Module`` that returns logits
  (a Hugging Face model is audited through a three-line factory). ``--weights`` is optional.

``--classes`` names the outputs in order (a comma list, or a file of one name per line;
default: the dataset's classes). Input size, mean and std come from the model's own
configuration (timm's ``pretrained_cfg``, torchvision's weights meta) unless given, else 224
and ImageNet's.

Every source resolves to a cam-audit checkpoint in memory whose ``arch`` is the spec: that is
what Ray's workers receive. They rebuild the architecture from the spec and load its state
dict strictly, so every actor explains the very weights the driver resolved.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from audit.errors import CheckpointError, first_line
from audit.models.checkpoint import (
    CHECKPOINT_FORMAT,
    Checkpoint,
    build_model,
    checkpoint_from_bytes,
    load_model,
    parse_arch,
    sha256_file,
    state_dict_mismatch,
    validated_checkpoint,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_INPUT_SIZE = (224, 224)


@dataclass(frozen=True)
class ModelRequest:
    """What the user named: the spec and the options that complete it."""

    spec: str
    weights: str | None = None
    classes: tuple[str, ...] | None = None
    input_size: tuple[int, int] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @property
    def kind(self) -> str:
        return spec_kind(self.spec)


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to audit: the checkpoint the workers receive, as bytes and as read back."""

    request: ModelRequest
    checkpoint: Checkpoint
    data: bytes
    sha256: str  # of the checkpoint or weights file; of the state dict when there is no file
    model: nn.Module  # the driver's copy, in eval mode

    def info(self) -> dict:
        """What run.json records about the model (never a credential: paths and hashes only)."""
        checkpoint = self.checkpoint
        return {
            "spec": self.request.spec,
            "source": self.request.kind,
            "weights": self.request.weights,
            "sha256": self.sha256,
            "arch": checkpoint.arch,
            "classes": list(checkpoint.classes),
            "input_size": list(checkpoint.input_size),
            "mean": list(checkpoint.mean),
            "std": list(checkpoint.std),
        }


def spec_kind(spec: str) -> str:
    """``checkpoint``, ``timm``, ``torchvision`` or ``module``."""
    if spec.startswith(("timm:", "torchvision:")):
        return spec.split(":", 1)[0]
    if re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", spec) and not Path(spec).exists():
        return "module"
    return "checkpoint"


def check_request(request: ModelRequest) -> None:
    """The cheap checks of a spec (the name exists, the module imports, the weights file is there),
    so that a bad spec fails in one line before a dataset is read."""
    kind, name = parse_arch(request.spec) if request.kind != "checkpoint" else ("checkpoint", request.spec)
    if kind == "timm":
        import timm

        if not timm.is_model(name):
            build_model(request.spec, 1)  # the error with its close matches
    elif kind == "torchvision":
        from audit.models.checkpoint import classification_architectures

        if name not in classification_architectures():
            build_model(request.spec, 1)
    elif kind == "module":
        import_factory(request.spec)
    if request.weights and not Path(request.weights).is_file():
        raise CheckpointError(f"weights not found: {request.weights}")


def resolve_model(request: ModelRequest, dataset_classes: Sequence[str] | None = None) -> ResolvedModel:
    """Build, load and describe the model ``request`` names (a one-line CheckpointError when it cannot)."""
    if request.kind == "checkpoint":
        return _from_checkpoint_file(request)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random weights, where no file gives them, are the same in every resolution
        model = build_model(request.spec, len(request.classes or dataset_classes or ()) or None, request.input_size)
    if request.weights:
        _load_weights(model, request.weights, request.spec)
        sha = sha256_file(request.weights)
    else:
        sha = state_dict_sha256(model.state_dict())
    model.eval()
    input_size, mean, std = _preprocessing(model, request)
    outputs = _output_count(model, input_size)
    classes = tuple(request.classes or dataset_classes or (str(i) for i in range(outputs)))
    if len(classes) != outputs:
        raise CheckpointError(f"{request.spec} returns {outputs} logits but {len(classes)} classes were given")
    checkpoint = validated_checkpoint(
        {
            "format": CHECKPOINT_FORMAT,
            "arch": request.spec,
            "classes": list(classes),
            "input_size": list(input_size),
            "mean": list(mean),
            "std": list(std),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        },
        source=request.spec,
    )
    buffer = io.BytesIO()
    torch.save(checkpoint.to_dict(), buffer)
    return ResolvedModel(request, checkpoint, buffer.getvalue(), sha, model)


def _from_checkpoint_file(request: ModelRequest) -> ResolvedModel:
    extras = [
        flag
        for flag, value in (
            ("--weights", request.weights),
            ("--classes", request.classes),
            ("--input-size", request.input_size),
            ("--mean", request.mean),
            ("--std", request.std),
        )
        if value is not None
    ]
    if extras:
        raise CheckpointError(
            f"{', '.join(extras)} complete a timm:, torchvision: or module:callable spec; "
            f"the cam-audit checkpoint {request.spec} holds its own"
        )
    path = Path(request.spec)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint not found: {request.spec} (a model is a checkpoint file, timm:NAME, "
            f"torchvision:NAME or package.module:callable)"
        )
    data = path.read_bytes()
    checkpoint = checkpoint_from_bytes(data, source=request.spec)
    return ResolvedModel(request, checkpoint, data, hashlib.sha256(data).hexdigest(), load_model(checkpoint))


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors``, or from a torch file read with ``weights_only=True``
    (a bare state dict, or a checkpoint holding one under ``state_dict`` or ``model``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: object = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is one line about this file
        raise CheckpointError(f"{path}: not readable weights ({first_line(exc)})") from exc
    if isinstance(raw, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(raw.get(key), Mapping):
                raw = raw[key]
                break
    if not (isinstance(raw, Mapping) and raw and all(isinstance(v, torch.Tensor) for v in raw.values())):
        raise CheckpointError(f"{path}: expected a state dict (parameter names to tensors)")
    state = dict(raw)
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _load_weights(model: nn.Module, path: str, spec: str) -> None:
    state = read_weights(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit {spec}: {state_dict_mismatch(model.state_dict(), state)}") from exc


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """A hash of names, dtypes, shapes and values: the same weights give the same hash."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _output_count(model: nn.Module, input_size: tuple[int, int]) -> int:
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    try:
        with torch.inference_mode():
            logits = model(torch.zeros(1, 3, *input_size, device=device))
    except Exception as exc:  # noqa: BLE001 - the user's model: any failure is one line
        raise CheckpointError(
            f"the model does not run on a {input_size[0]}x{input_size[1]} input: {first_line(exc)}"
        ) from exc
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        kind = type(logits).__name__ if not isinstance(logits, torch.Tensor) else f"{logits.ndim}-D tensor"
        raise CheckpointError(f"the model must return a (batch, classes) tensor of logits, got a {kind}")
    return int(logits.shape[1])


def _preprocessing(model: nn.Module, request: ModelRequest):
    own_size, own_mean, own_std = _own_preprocessing(model, request.spec)
    return (
        request.input_size or own_size,
        request.mean or own_mean,
        request.std or own_std,
    )


def _own_preprocessing(model: nn.Module, spec: str):
    """(input_size, mean, std) from the model's configuration: timm's pretrained_cfg, a fixed
    ``image_size`` (torchvision's ViT), torchvision's weights meta; else 224 and ImageNet's."""
    size, mean, std = DEFAULT_INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, Mapping):
        if isinstance(cfg.get("input_size"), Sequence) and len(cfg["input_size"]) == 3:
            size = (int(cfg["input_size"][1]), int(cfg["input_size"][2]))
        mean = tuple(float(v) for v in cfg.get("mean", mean))[:3]
        std = tuple(float(v) for v in cfg.get("std", std))[:3]
        return size, mean, std
    kind, name = parse_arch(spec)
    if kind == "torchvision":
        size, mean, std = _torchvision_preprocessing(name, size, mean, std)
    image_size = getattr(model, "image_size", None)
    if isinstance(image_size, int):
        size = (image_size, image_size)
    return size, mean, std


def _torchvision_preprocessing(name: str, size, mean, std):
    import torchvision

    try:
        transforms = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    except (ValueError, AttributeError, KeyError):
        return size, mean, std
    crop = getattr(transforms, "crop_size", None)
    if crop:
        size = (int(crop[0]), int(crop[-1]))
    return size, tuple(transforms.mean), tuple(transforms.std)


def parse_classes(value: str) -> tuple[str, ...]:
    """``--classes``: a file of one name per line, or a comma list."""
    path = Path(value)
    names = path.read_text().splitlines() if path.is_file() else value.split(",")
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise CheckpointError(f"--classes {value!r} names no class")
    if len(set(names)) != len(names):
        raise CheckpointError(f"--classes {value!r} has duplicate names")
    return tuple(names)


def import_factory(spec: str):
    """The callable ``package.module:callable`` names, imported from the current directory and PYTHONPATH."""
    module_name, _, attribute = spec.partition(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        target: object = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - the team's module may fail in any way on import
        raise CheckpointError(f"cannot import {module_name!r} for --model {spec}: {first_line(exc)}") from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise CheckpointError(f"module {module_name!r} has no {attribute!r} (--model {spec})")
        target = getattr(target, part)
    if not callable(target):
        raise CheckpointError(f"{spec} is not callable: expected a function or class returning an nn.Module")
    return target


def module_root(spec: str) -> str | None:
    """The folder or file of the top-level package a ``package.module:callable`` spec imports
    (shipped to Ray's workers as a ``py_modules`` entry), or None for an installed one."""
    if spec_kind(spec) != "module":
        return None
    top = spec.split(":", 1)[0].split(".", 1)[0]
    import_factory(spec)
    module = sys.modules.get(top)
    origin = getattr(module, "__file__", None)
    if origin is None:
        paths = list(getattr(module, "__path__", []))
        return paths[0] if paths else None
    origin_path = Path(origin)
    if "site-packages" in origin_path.parts or "dist-packages" in origin_path.parts:
        return None
    return str(origin_path.parent if origin_path.name == "__init__.py" else origin_path)
