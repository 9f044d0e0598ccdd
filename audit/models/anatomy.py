"""Find where to explain a classifier: the target layer, how its output holds a feature map, and CAM's head.

Everything is found by running the model once on a probe input (forward and backward) and
watching every module with hooks, so the rules hold for torchvision, timm and a team's own
modules without a per-architecture table:

* layouts: a module's output is a feature map when it is channels-first (N, C, H, W),
  channels-last (N, H, W, C: Swin, some timm stages) or a token sequence (N, T, C) whose
  patch tokens fill the model's patch grid. The grid of a 4-D map must be the input
  subsampled by one integer stride on both axes (``_fits_input``), which a tensor inside an
  attention (heads x tokens x dims) never is. Token grids come from the model: timm's
  ``patch_embed.grid_size`` and ``num_prefix_tokens`` where it has them, else the patch
  embedding's own 4-D output and the longest token sequence after it (class, distillation and
  register tokens are the prefix); hierarchical token models (LeViT) subsample that grid. A
  token sequence must also have the width of the model's residual stream (the last token
  sequence it produces), so a fused q/k/v projection is never read as a map.
* reach: the class score's gradient must reach the map's spatial positions. After the last
  transformer block nothing mixes tokens, so a class-token readout gives every patch token a
  zero gradient and would give all-zero maps; such layers never qualify.
* target layer: among the qualifying layers of the last stage (those on the coarsest grid),
  the last to finish (``layer4`` of a ResNet, ``features`` of a DenseNet, the last block's
  first norm of a ViT, the final norm of a Swin). When none qualifies the error lists the
  candidates and asks for ``--target-layer``.
* CAM head: CAM needs ``logits = W f(A).mean((h, w)) + b``, a global-average-pool read
  straight by one linear layer that produces the logits. The probe checks this numerically
  on the map in its (N, C, h, w) reading: the last ``nn.Linear`` must output the model's
  logits, no module with parameters or buffers may run between the target layer and it (a
  random-init BatchNorm is the identity and would pass a numerical check), and its input must
  equal the spatial mean of ``f(A)``, where ``f`` is the identity or a ReLU (DenseNet applies
  a functional ReLU between its feature map and the pool). Whatever pools (torchvision's
  or timm's adaptive pool, a mean over tokens, a mean over H and W of a channels-last map) is
  accepted when the numbers agree. Anything else (VGG's hidden layers, MobileNetV3's hidden
  layer, ConvNeXt's LayerNorm after the pool, a ViT's class token) has no CAM, and the reason
  says why.
* a finer layer, for maps too coarse to localize (fewer than :data:`MIN_MAP_SIDE` cells on a
  side): the last qualifying layer whose grid has at least that many on both sides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor, nn

from audit.errors import ModelAnatomyError, first_line

MIN_MAP_SIDE = 7  # a map with fewer cells on a side spills over a small object once upsampled
MAX_PREFIX_TOKENS = 16  # class, distillation and register tokens before the patch tokens
_POOLING = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)
_NOT_A_LAYER = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)  # the same tensor as the module before
LAYOUTS = ("nchw", "nhwc", "tokens")


@dataclass(frozen=True)
class FeatureLayout:
    """How a layer's output holds a feature map, and how to read it as (N, C, h, w)."""

    kind: Literal["nchw", "nhwc", "tokens"]
    grid: tuple[int, int]  # (h, w)
    channels: int
    prefix_tokens: int = 0  # tokens before the patch tokens (tokens layout only)

    def to_nchw(self, tensor: Tensor) -> Tensor:
        """The layer's output (or its gradient) as (N, C, h, w), prefix tokens dropped."""
        if self.kind == "nchw":
            return tensor
        if self.kind == "nhwc":
            return tensor.permute(0, 3, 1, 2)
        h, w = self.grid
        patches = tensor[:, self.prefix_tokens :, :]
        return patches.reshape(tensor.shape[0], h, w, tensor.shape[-1]).permute(0, 3, 1, 2)

    def describe(self) -> str:
        grid = f"{self.grid[0]}x{self.grid[1]}"
        prefix = f" after {self.prefix_tokens} prefix token(s)" if self.prefix_tokens else ""
        return f"{self.kind} {grid} grid of {self.channels} channels{prefix}"


@dataclass(frozen=True)
class CamHead:
    """``logits[:, c] = sum_k weight[c, k] * mean_ij f(A)[:, k, i, j] + bias[c]``."""

    name: str
    weight: Tensor  # (classes, channels)
    bias: Tensor | None
    activation: Literal["identity", "relu"]


@dataclass(frozen=True)
class Candidate:
    """A layer one could explain at."""

    name: str
    layout: FeatureLayout

    def describe(self) -> str:
        return f"{self.name} ({self.layout.describe()})"


@dataclass(frozen=True)
class Anatomy:
    """Where a model is explained, how its output is read, and whether CAM applies there."""

    target_layer: str
    layout: FeatureLayout
    cam_head: CamHead | None
    cam_note: str | None  # why there is no CAM, when cam_head is None
    finer_layer: tuple[str, int, int] | None = None  # (name, h, w) where the maps are too coarse
    candidates: tuple[Candidate, ...] = field(default=(), compare=False)  # qualifying layers, last first

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """(channels, h, w) of the map at the probe's input size."""
        return (self.layout.channels, *self.layout.grid)

    @property
    def gradcam_proportional_to_cam(self) -> bool:
        """True when Grad-CAM equals CAM up to scale by construction (GAP -> linear on A itself).

        There dY_c/dA_kij = W[c, k] / (h w) at every position, so the Grad-CAM weights are
        W[c, :] / (h w) and the two maps agree whatever the model looks at.
        """
        return self.cam_head is not None and self.cam_head.activation == "identity"

    def on(self, model: nn.Module) -> Anatomy:
        """This anatomy for another model of the same architecture (CAM's weights read from it)."""
        if self.cam_head is None:
            return self
        module = dict(model.named_modules())[self.cam_head.name]
        bias = module.bias.detach() if module.bias is not None else None
        return replace(self, cam_head=replace(self.cam_head, weight=module.weight.detach(), bias=bias))


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
            raise ModelAnatomyError(f"no module named {name!r} to use as the {kind}; see `audit model inspect`")
    probe = _probe(model, input_size)
    candidates = qualifying_layers(probe)
    if target_layer:
        target = check_target_layer(probe, target_layer, candidates)
    else:
        target = choose_target_layer(candidates)
        _check_last_stage(probe, target, candidates)
    layout = probe.layouts[target]
    head, note = find_cam_head(probe, target, classifier)
    return Anatomy(
        target_layer=target,
        layout=layout,
        cam_head=head,
        cam_note=note,
        finer_layer=find_finer_layer(candidates, layout),
        candidates=tuple(reversed(candidates)),
    )


@dataclass
class _Probe:
    modules: dict[str, nn.Module]
    order: list[str]  # module names in the order their forward finished
    outputs: dict[str, Tensor]
    inputs: dict[str, Tensor]
    logits: Tensor
    input_size: tuple[int, int]
    layouts: dict[str, FeatureLayout] = field(default_factory=dict)
    reach: dict[str, bool] = field(default_factory=dict)  # the class score's gradient reaches the map


def _probe(model: nn.Module, input_size: tuple[int, int]) -> _Probe:
    """Run the model once on a random batch of two, recording every module's input and output,
    and the gradient of one class score at every output."""
    modules = {name: module for name, module in model.named_modules() if name}
    order: list[str] = []
    outputs: dict[str, Tensor] = {}
    inputs: dict[str, Tensor] = {}
    live: dict[str, Tensor] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> object:
            order.append(name)
            if isinstance(module, nn.Linear) and args and isinstance(args[0], Tensor):
                inputs[name] = args[0].detach().clone()
            if not isinstance(output, Tensor):
                return None
            # Clones: later in-place operations (DenseNet's ReLU) must not rewrite what we saw.
            outputs[name] = output.detach().clone()
            if not output.requires_grad:
                return None
            live[name] = output
            return output.clone()  # what follows works on the clone; `output` keeps its gradient

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in modules.items()]
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *input_size, generator=generator).to(device).requires_grad_(True)
    was_training = model.training
    zeroed = _fill_zero_parameters(model)
    try:
        model.eval()
        with torch.enable_grad():
            logits = model(x)
            if not isinstance(logits, Tensor) or logits.ndim != 2:
                raise ModelAnatomyError("the model must return a (batch, classes) tensor of logits")
            gradients = _gradients(logits, live)
    except ModelAnatomyError:
        raise
    except Exception as exc:
        raise ModelAnatomyError(
            f"the model does not run on a {input_size[0]}x{input_size[1]} input: {first_line(exc)}"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for parameter in zeroed:
                parameter.zero_()
        model.train(was_training)
    probe = _Probe(modules, order, outputs, inputs, logits.detach(), input_size)
    probe.layouts = _layouts(model, probe)
    probe.reach = {name: _reaches(probe.layouts[name], gradients.get(name)) for name in probe.layouts}
    return probe


def _fill_zero_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Give all-zero weight tensors small random values for the probe, and return them to restore.

    A zero-initialised classifier (torchvision's ViT head) passes no gradient at all, so no
    layer could be judged; the probe's other checks are structural and hold for any values.
    """
    zeroed = []
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim >= 2 and parameter.is_floating_point() and not parameter.any():
                noise = torch.randn(parameter.shape, generator=generator) * 0.02
                parameter.copy_(noise.to(parameter.device, parameter.dtype))
                zeroed.append(parameter)
    return zeroed


def _gradients(logits: Tensor, live: dict[str, Tensor]) -> dict[str, Tensor]:
    """d logits[:, 0].sum() / d output for every recorded output (no parameter's .grad is touched)."""
    names = list(live)
    try:
        grads = torch.autograd.grad(logits[:, 0].sum(), [live[n] for n in names], allow_unused=True)
    except RuntimeError:  # a model that cannot be differentiated: reach is not judged
        return {}
    return {name: grad for name, grad in zip(names, grads) if grad is not None}


def _reaches(layout: FeatureLayout, gradient: Tensor | None) -> bool:
    if gradient is None:
        return False
    spatial = layout.to_nchw(gradient.detach()).abs().float()
    whole = gradient.detach().abs().float().sum()
    return bool(spatial.sum() > 1e-6 * whole) and bool(spatial.amax(dim=1).flatten(1).gt(0).any())


def _fits_input(h: int, w: int, input_size: tuple[int, int]) -> bool:
    """True when (h, w) is the input subsampled by one integer stride on both axes, give or take
    what convolutions without padding cut off (a tenth, or a cell and a half), and larger than one cell."""
    height, width = input_size
    if h * w <= 1 or h > height or w > width:
        return False
    for stride in {max(1, math.floor(height / h)), math.ceil(height / h)}:
        slack = max(1.5, 0.1 * height / stride)
        if abs(height / stride - h) <= slack and abs(width / stride - w) <= max(1.5, 0.1 * width / stride):
            return True
    return False


def _layouts(model: nn.Module, probe: _Probe) -> dict[str, FeatureLayout]:
    """Every recorded output that is a feature map, with its layout."""
    batch = probe.logits.shape[0]
    found: dict[str, FeatureLayout] = {}
    for name in probe.order:
        output = probe.outputs.get(name)
        if output is None or output.shape[0] != batch or output.ndim != 4:
            continue
        _, a, b, c = output.shape
        if _fits_input(b, c, probe.input_size):
            found[name] = FeatureLayout("nchw", (b, c), a)
        elif _fits_input(a, b, probe.input_size):
            found[name] = FeatureLayout("nhwc", (a, b), c)
    found.update(_token_layouts(model, probe, found))
    return found


def _token_layouts(model: nn.Module, probe: _Probe, maps: dict[str, FeatureLayout]) -> dict[str, FeatureLayout]:
    """Token sequences (N, T, C) on the model's patch grid (or a grid it subsamples to)."""
    batch = probe.logits.shape[0]
    sequences = [
        name
        for name in probe.order
        if (out := probe.outputs.get(name)) is not None and out.ndim == 3 and out.shape[0] == batch
    ]
    if not sequences:
        return {}
    grid = _patch_grid(model, probe, maps, sequences[0])
    if grid is None:
        return {}
    by_cells: dict[int, tuple[int, int]] = {}
    for k in range(6):  # the patch grid, and the grids a hierarchical token model pools it to
        h, w = math.ceil(grid[0] / 2**k), math.ceil(grid[1] / 2**k)
        by_cells.setdefault(h * w, (h, w))
    prefix = getattr(model, "num_prefix_tokens", None)
    if not isinstance(prefix, int):  # the most tokens any sequence holds beyond a grid's cells
        extra = [_tokens_beyond_a_grid(probe.outputs[n].shape[1], by_cells) for n in sequences]
        prefix = max((e for e in extra if e is not None), default=0)
    width = residual_width(probe, sequences)
    found: dict[str, FeatureLayout] = {}
    for name in sequences:
        _, tokens, channels = probe.outputs[name].shape
        if channels != width or isinstance(probe.modules[name], nn.Linear):
            continue  # a projection (q, k, v, an MLP layer, a per-token head) is not the token stream
        for skip in (prefix, 0):
            cells = tokens - skip
            if cells > 1 and cells in by_cells:
                found[name] = FeatureLayout("tokens", by_cells[cells], channels, skip)
                break
    return found


def _tokens_beyond_a_grid(tokens: int, by_cells: dict[int, tuple[int, int]]) -> int | None:
    """The fewest tokens (at most :data:`MAX_PREFIX_TOKENS`) that leave a grid's cells, if any do."""
    return next((e for e in range(MAX_PREFIX_TOKENS + 1) if tokens - e in by_cells), None)


def residual_width(probe: _Probe, sequences: list[str]) -> int:
    """The width of the token stream: that of the last sequence a module other than a linear
    projection produces (a norm, a block), so a per-token head (VOLO's) does not set it."""
    streams = [n for n in sequences if not isinstance(probe.modules[n], nn.Linear)] or sequences
    return int(probe.outputs[streams[-1]].shape[-1])


def _patch_grid(model: nn.Module, probe: _Probe, maps: dict[str, FeatureLayout], first: str) -> tuple[int, int] | None:
    """The patch grid: timm's ``patch_embed.grid_size``, else the last 4-D map before the first token sequence."""
    patch_embed = getattr(model, "patch_embed", None)
    grid = getattr(patch_embed, "grid_size", None)
    if isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(v, int) for v in grid):
        return int(grid[0]), int(grid[1])
    before = probe.order[: probe.order.index(first)]
    earlier = [maps[n].grid for n in before if n in maps]
    return earlier[-1] if earlier else None


def qualifying_layers(probe: _Probe) -> list[Candidate]:
    """Layers whose output is a feature map the class score's gradient reaches, in finishing order."""
    judged = bool(probe.reach) and any(probe.reach.values())
    out = []
    for name in dict.fromkeys(probe.order):
        layout = probe.layouts.get(name)
        module = probe.modules[name]
        if layout is None or isinstance(module, _POOLING + _NOT_A_LAYER):
            continue
        if judged and not probe.reach.get(name, False):
            continue
        out.append(Candidate(name, layout))
    return out


def choose_target_layer(candidates: list[Candidate]) -> str:
    """The last qualifying layer of the last stage: on the coarsest grid, the last to finish."""
    if not candidates:
        raise ModelAnatomyError(
            "no layer of this model outputs a feature map that the class score's gradient reaches "
            "((N, C, H, W), (N, H, W, C) or patch tokens (N, T, C)); name one with --target-layer "
            "(`audit model inspect` lists the layers)"
        )
    coarsest = min(c.layout.grid[0] * c.layout.grid[1] for c in candidates)
    return [c for c in candidates if c.layout.grid[0] * c.layout.grid[1] == coarsest][-1].name


def _check_last_stage(probe: _Probe, target: str, candidates: list[Candidate]) -> None:
    """Refuse an automatic choice that lies before the model's last stage: a token stream that
    no grid of the model explains runs after it (two-branch models such as CrossViT)."""
    batch = probe.logits.shape[0]
    sequences = [
        n
        for n in probe.order
        if (out := probe.outputs.get(n)) is not None and out.ndim == 3 and out.shape[0] == batch and out.shape[1] > 1
    ]
    streams = [n for n in sequences if not isinstance(probe.modules[n], nn.Linear)]
    if not streams or streams[-1] in probe.layouts:
        return
    last = streams[-1]
    if probe.order.index(last) > max(i for i, n in enumerate(probe.order) if n == target):
        shape = "x".join(map(str, probe.outputs[last].shape))
        shown = ", ".join(c.describe() for c in list(reversed(candidates))[:3])
        raise ModelAnatomyError(
            f"the model's last stage outputs token sequences ({last!r}: {shape}) on no patch grid the model "
            f"declares, so no layer there can be read as a map; the readable layers come earlier ({shown}); "
            f"name one with --target-layer if it suits you"
        )


def check_target_layer(probe: _Probe, name: str, candidates: list[Candidate]) -> str:
    """``name`` when it outputs a feature map that the class score's gradient reaches, else a clear error."""
    output = probe.outputs.get(name)
    if output is None:
        raise ModelAnatomyError(f"target layer {name!r} did not return a tensor in the forward pass")
    suggestion = f"; the automatic choice is {choose_target_layer(candidates)!r}" if candidates else ""
    shape = "x".join(map(str, output.shape))
    if name not in probe.layouts:
        raise ModelAnatomyError(
            f"target layer {name!r} outputs a {shape} tensor, not a feature map: expected (N, C, H, W), "
            f"(N, H, W, C) or patch tokens (N, T, C) on the model's grid{suggestion}"
        )
    if probe.reach and any(probe.reach.values()) and not probe.reach.get(name, False):
        raise ModelAnatomyError(
            f"target layer {name!r} gets no gradient from the class score at its spatial positions "
            f"(nothing after it mixes them: a class-token readout), so its maps would be all zero{suggestion}"
        )
    return name


def find_finer_layer(candidates: list[Candidate], layout: FeatureLayout) -> tuple[str, int, int] | None:
    """Where the target's maps have fewer than :data:`MIN_MAP_SIDE` cells on a side: the last
    qualifying layer with at least that many on both sides, as (name, h, w)."""
    if min(layout.grid) >= MIN_MAP_SIDE:
        return None
    for candidate in reversed(candidates):
        h, w = candidate.layout.grid
        if min(h, w) >= MIN_MAP_SIDE:
            return candidate.name, h, w
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
    if probe.order.index(name) < probe.order.index(target_layer):
        return None, f"CAM needs the linear layer {name!r} to run after the target layer {target_layer!r}"
    between = probe.order[probe.order.index(target_layer) + 1 : probe.order.index(name)]
    transforms = [
        step for step in between if _has_state(probe.modules[step]) and not target_layer.startswith(step + ".")
    ]
    if transforms:
        shown = ", ".join(repr(step) for step in transforms[:3]) + (" ..." if len(transforms) > 3 else "")
        return (
            None,
            f"CAM needs {name!r} to read the global-average-pool of {target_layer!r} directly; {shown} run between",
        )
    activation = probe.layouts[target_layer].to_nchw(probe.outputs[target_layer]).float()
    pooled = linear_in.float().flatten(1)
    for kind, mapped in (("identity", activation), ("relu", activation.relu())):
        gap = mapped.mean(dim=(2, 3))
        if gap.shape == pooled.shape and _close(gap, pooled):
            module = probe.modules[name]
            bias = module.bias.detach() if module.bias is not None else None
            return CamHead(name, module.weight.detach(), bias, kind), None
    return None, (
        f"CAM needs {name!r} to read the global-average-pool of {target_layer!r} directly; "
        f"this head transforms it first (hidden layers, a normalisation, a class token, or a pool other "
        f"than a global average)"
    )


def _has_state(module: nn.Module) -> bool:
    """Parameters or buffers: a module that may transform what the pool reads (a BatchNorm, a LayerNorm)."""
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _close(a: Tensor, b: Tensor) -> bool:
    return torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)


def randomization_cascade(model: nn.Module, input_size: tuple[int, int], target_layer: str) -> list[list[str]]:
    """The modules a cascading model-parameter randomization re-initialises, cumulatively, top down.

    Step 0 is the head: every module with parameters that runs after ``target_layer`` (the
    classifier, and the rest of a transformer block the target sits in). Then the blocks of the
    target layer's stage, last first: its direct children with parameters whose output is a map
    on the target layer's grid (``layer4.1``, ``layer4.0`` of a ResNet); a target layer without
    such children is one block itself. The last step goes one block beyond: the module with
    parameters that ran before it at the nearest level that has one (``layer3``; ``blocks.10``
    for a ViT explained at ``blocks.11.norm1``), else the next child of the target layer (a
    DenseNet's ``features``). Each step lists every module randomized so far.
    """
    probe = _probe(model, input_size)
    finished = {name: index for index, name in enumerate(probe.order)}
    target = probe.modules[target_layer]
    grid = probe.layouts[target_layer].grid if target_layer in probe.layouts else None
    head = [
        name
        for name in probe.order[finished[target_layer] + 1 :]
        if _owns_parameters(probe.modules[name]) and not name.startswith(target_layer + ".")
    ]
    head = list(dict.fromkeys(head))
    children = _children_in_order(target, target_layer, finished)
    stage: list[str] = []
    beyond: str | None = None
    for name in reversed(children):
        layout = probe.layouts.get(name)
        if layout is not None and layout.grid == grid and beyond is None:
            stage.append(name)
        elif beyond is None:
            beyond = name
    if len(stage) < 2:
        stage, beyond = [target_layer], None
    if beyond is None or not stage[-1].startswith(target_layer + "."):
        beyond = _earlier_sibling(model, probe, target_layer, finished) or beyond
    steps, randomized = [], []
    for block in [head, *([name] for name in stage), [beyond] if beyond else []]:
        if block:
            randomized = randomized + [name for name in block if name not in randomized]
            steps.append(randomized)
    return steps


def _earlier_sibling(model: nn.Module, probe: _Probe, name: str, finished: dict[str, int]) -> str | None:
    """The module with parameters that ran just before ``name`` at its level, or at its parent's, and so on up."""
    while name:
        parent_name = name.rpartition(".")[0]
        parent = probe.modules.get(parent_name, model) if parent_name else model
        siblings = _children_in_order(parent, parent_name, finished)
        earlier = siblings[: siblings.index(name)] if name in siblings else []
        if earlier:
            return earlier[-1]
        name = parent_name
    return None


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
