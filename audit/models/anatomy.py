"""Find where to explain a classifier: the target layer, and the head that CAM needs.

Both are found by running the model once on a probe input and watching it with forward
hooks, so the rules hold for any torchvision CNN without a per-architecture table:

* target layer: the last module to finish whose output is a 4-D feature map with more
  than one spatial position, pooling layers excluded (``layer4`` of a ResNet,
  ``features`` of a DenseNet, EfficientNet, MobileNet, ConvNeXt or VGG).
* CAM head: CAM needs ``logits = W f(A).mean((h, w)) + b``, a global-average-pool read
  straight by one linear layer that produces the logits. The probe checks this numerically:
  the last ``nn.Linear`` must output the model's logits, no module other than a pool,
  flatten, dropout or ReLU may run between the target layer and it (a random-init
  BatchNorm is the identity and would pass a numerical check), and its input must equal
  the spatial mean of ``f(A)``, where ``f`` is the identity or a ReLU (DenseNet applies a
  functional ReLU between its feature map and the pool). Anything else (VGG's hidden
  layers, MobileNetV3's hidden layer, ConvNeXt's LayerNorm after the pool) has no CAM,
  and the reason says why.
* a finer layer, for maps too coarse to localize (fewer than :data:`MIN_MAP_SIDE` cells on a
  side): the last module to finish whose feature map has at least that many on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from audit.errors import ModelAnatomyError

MIN_MAP_SIDE = 7  # a map with fewer cells on a side spills over a small object once upsampled
_POOLING = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)
# Modules that may run between the target layer and CAM's linear layer without changing what
# the pool reads (Dropout is the identity in eval mode).
_PASS_THROUGH = (nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Dropout2d, nn.Identity, nn.ReLU)


@dataclass(frozen=True)
class CamHead:
    """``logits[:, c] = sum_k weight[c, k] * mean_ij f(A)[:, k, i, j] + bias[c]``."""

    name: str
    weight: Tensor  # (classes, channels)
    bias: Tensor | None
    activation: Literal["identity", "relu"]


@dataclass(frozen=True)
class Anatomy:
    """Where a model is explained, and whether CAM applies there."""

    target_layer: str
    feature_shape: tuple[int, int, int]  # (channels, h, w) at the probe's input size
    cam_head: CamHead | None
    cam_note: str | None  # why there is no CAM, when cam_head is None
    finer_layer: tuple[str, int, int] | None = None  # (name, h, w) where the maps are too coarse

    @property
    def gradcam_proportional_to_cam(self) -> bool:
        """True when Grad-CAM equals CAM up to scale by construction (GAP -> linear on A itself).

        There dY_c/dA_kij = W[c, k] / (h w) at every position, so the Grad-CAM weights are
        W[c, :] / (h w) and the two maps agree whatever the model looks at.
        """
        return self.cam_head is not None and self.cam_head.activation == "identity"


def inspect_model(
    model: nn.Module,
    input_size: tuple[int, int],
    target_layer: str | None = None,
    classifier: str | None = None,
) -> Anatomy:
    """Locate the target layer (or check the named one) and the CAM head, from one probe pass."""
    modules = dict(model.named_modules())
    for kind, name in (("target layer", target_layer), ("classifier", classifier)):
        if name is not None and (name not in modules or name == ""):
            raise ModelAnatomyError(f"no module named {name!r} to use as the {kind}; see model.named_modules()")
    probe = _probe(model, input_size)
    target = target_layer or find_target_layer(probe)
    activation = probe.outputs.get(target)
    if activation is None or activation.ndim != 4:
        raise ModelAnatomyError(f"target layer {target!r} does not output a 4-D feature map (N, C, H, W)")
    head, note = find_cam_head(probe, target, classifier)
    return Anatomy(
        target_layer=target,
        feature_shape=tuple(activation.shape[1:]),
        cam_head=head,
        cam_note=note,
        finer_layer=find_finer_layer(probe, target),
    )


@dataclass
class _Probe:
    modules: dict[str, nn.Module]
    order: list[str]  # module names in the order their forward finished
    outputs: dict[str, Tensor]
    inputs: dict[str, Tensor]
    logits: Tensor


def _probe(model: nn.Module, input_size: tuple[int, int]) -> _Probe:
    """Run the model once on a random batch of two, recording every module's input and output."""
    modules = {name: module for name, module in model.named_modules() if name}
    order: list[str] = []
    outputs: dict[str, Tensor] = {}
    inputs: dict[str, Tensor] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            order.append(name)
            # Clones: later in-place operations (DenseNet's ReLU) must not rewrite what we saw.
            if isinstance(output, Tensor):
                outputs[name] = output.clone()
            if isinstance(module, nn.Linear) and args and isinstance(args[0], Tensor):
                inputs[name] = args[0].clone()

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in modules.items()]
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *input_size, generator=generator).to(device)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            logits = model(x)
    except Exception as exc:
        raise ModelAnatomyError(f"the model does not run on a {input_size[0]}x{input_size[1]} input: {exc}") from exc
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        raise ModelAnatomyError("the model must return a (batch, classes) tensor of logits")
    return _Probe(modules, order, outputs, inputs, logits)


def find_target_layer(probe: _Probe) -> str:
    """The last module to finish with a 4-D output larger than 1x1 that is not a pooling layer."""
    for name in reversed(probe.order):
        output = probe.outputs.get(name)
        if output is None or output.ndim != 4 or output.shape[-2] * output.shape[-1] <= 1:
            continue
        if isinstance(probe.modules[name], _POOLING):
            continue
        return name
    raise ModelAnatomyError("no 4-D feature map larger than 1x1 found: is this a CNN, and is the input large enough?")


def find_finer_layer(probe: _Probe, target_layer: str) -> tuple[str, int, int] | None:
    """Where ``target_layer``'s maps have fewer than :data:`MIN_MAP_SIDE` cells on a side: the last
    module to finish with a feature map of at least that many on both sides, as (name, h, w)."""
    h, w = probe.outputs[target_layer].shape[-2:]
    if min(h, w) >= MIN_MAP_SIDE:
        return None
    for name in reversed(probe.order):
        output = probe.outputs.get(name)
        if output is None or output.ndim != 4 or isinstance(probe.modules[name], _POOLING):
            continue
        if min(output.shape[-2:]) >= MIN_MAP_SIDE:
            return name, int(output.shape[-2]), int(output.shape[-1])
    return None


def find_cam_head(probe: _Probe, target_layer: str, classifier: str | None = None) -> tuple[CamHead | None, str | None]:
    """The GAP -> linear head over ``target_layer``, or ``(None, reason)`` when there is none."""
    linears = [name for name in probe.order if isinstance(probe.modules[name], nn.Linear)]
    if classifier is not None and not isinstance(probe.modules[classifier], nn.Linear):
        return None, f"CAM needs a linear classifier; {classifier!r} is a {type(probe.modules[classifier]).__name__}"
    name = classifier or (linears[-1] if linears else None)
    if name is None:
        return None, "CAM needs a linear classifier after a global-average-pool; the model has no nn.Linear"
    linear_in, linear_out = probe.inputs.get(name), probe.outputs.get(name)
    if linear_out is None or linear_out.shape != probe.logits.shape or not _close(linear_out, probe.logits):
        return None, f"CAM needs the linear layer to produce the logits; operations follow {name!r}"
    between = probe.order[probe.order.index(target_layer) + 1 : probe.order.index(name)]
    transforms = [
        step
        for step in between
        if not isinstance(probe.modules[step], _PASS_THROUGH) and not target_layer.startswith(step + ".")
    ]
    if transforms:
        shown = ", ".join(repr(step) for step in transforms[:3]) + (" ..." if len(transforms) > 3 else "")
        return (
            None,
            f"CAM needs {name!r} to read the global-average-pool of {target_layer!r} directly; {shown} run between",
        )
    activation = probe.outputs[target_layer].float()
    pooled = linear_in.float().flatten(1)
    for kind, mapped in (("identity", activation), ("relu", activation.relu())):
        gap = mapped.mean(dim=(2, 3))
        if gap.shape == pooled.shape and _close(gap, pooled):
            module = probe.modules[name]
            bias = module.bias.detach() if module.bias is not None else None
            return CamHead(name, module.weight.detach(), bias, kind), None
    return None, (
        f"CAM needs {name!r} to read the global-average-pool of {target_layer!r} directly; "
        f"this head transforms it first (hidden layers, a normalisation, or a pool other than a global average)"
    )


def _close(a: Tensor, b: Tensor) -> bool:
    return torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)


def randomization_cascade(model: nn.Module, input_size: tuple[int, int], target_layer: str) -> list[list[str]]:
    """The modules a cascading model-parameter randomization re-initialises, cumulatively, top down.

    Step 0 is the head: every module with parameters that runs after ``target_layer`` (the
    classifier). Then the blocks of the target layer's stage, last first: its direct children with
    parameters whose output keeps the target layer's resolution (``layer4.1``, ``layer4.0`` of a
    ResNet); a target layer without such children is one block itself. The last step goes one
    block beyond the stage: the module with parameters that ran before it at the target layer's
    own level (``layer3``), else the next child of the target layer (a DenseNet's ``features``).
    Each step lists every module randomized so far.
    """
    probe = _probe(model, input_size)
    finished = {name: index for index, name in enumerate(probe.order)}
    target = probe.modules[target_layer]
    size = probe.outputs[target_layer].shape[-2:]
    head = [
        name
        for name in probe.order[finished[target_layer] + 1 :]
        if _owns_parameters(probe.modules[name]) and not name.startswith(target_layer + ".")
    ]
    children = _children_in_order(target, target_layer, finished)
    stage: list[str] = []
    beyond: str | None = None
    for name in reversed(children):
        output = probe.outputs.get(name)
        if output is not None and output.ndim == 4 and output.shape[-2:] == size and beyond is None:
            stage.append(name)
        elif beyond is None:
            beyond = name
    if len(stage) < 2:
        stage, beyond = [target_layer], None
    if beyond is None or not stage[-1].startswith(target_layer + "."):
        parent_name = target_layer.rpartition(".")[0]
        parent = probe.modules.get(parent_name, model) if parent_name else model
        siblings = _children_in_order(parent, parent_name, finished)
        earlier = siblings[: siblings.index(target_layer)] if target_layer in siblings else []
        beyond = earlier[-1] if earlier else beyond
    steps, randomized = [], []
    for block in [head, *([name] for name in stage), [beyond] if beyond else []]:
        if block:
            randomized = randomized + block
            steps.append(randomized)
    return steps


def _owns_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _children_in_order(module: nn.Module, prefix: str, finished: dict[str, int]) -> list[str]:
    """Direct children with parameters that ran, in the order they finished."""
    names = [
        f"{prefix}.{name}" if prefix else name
        for name, child in module.named_children()
        if any(True for _ in child.parameters())
    ]
    return sorted((n for n in names if n in finished), key=finished.get)
