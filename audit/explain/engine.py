"""The engine: CAM, Grad-CAM and Grad-CAM++ from one forward and one backward pass.

The whole forward runs under ``torch.no_grad()``; a forward hook on the target layer
swaps its output for a leaf tensor ``A`` that requires grad and switches grad mode on, so
autograd records only the head (pool, linear) on top of ``A``. One
``torch.autograd.grad(sum_n Y[n, c_n], A)`` then gives every image's gradients at once
(images do not interact in eval mode) and stops at ``A``: the backbone never builds a
graph, so explaining costs about one plain inference forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from audit.errors import ModelAnatomyError
from audit.explain.methods import CAM, GradCAM, GradCAMPlusPlus, normalize
from audit.models.anatomy import Anatomy, inspect_model


@dataclass
class Explanation:
    """One batch explained. Tensors live on the model's device.

    ``maps[m]`` is (N, h, w) in [0, 1] at the target layer's resolution, or None when
    method ``m`` does not apply to this model (the reason is in ``notes[m]``);
    ``empty[m]`` (N,) marks maps with no contrast, which are all zeros.
    """

    logits: Tensor  # (N, classes) float32
    probs: Tensor  # (N, classes) softmax of logits
    targets: Tensor  # (N,) explained class per image
    maps: dict[str, Tensor | None]
    empty: dict[str, Tensor | None]
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def preds(self) -> Tensor:
        return self.logits.argmax(dim=1)


class ExplainEngine:
    """Explains a classifier at one target layer with CAM, Grad-CAM and Grad-CAM++.

    Args:
        model: a classifier returning (N, classes) logits; the engine puts it in eval mode.
        input_size: (h, w) the model is fed, used once to probe its layers.
        target_layer: module name to explain; found automatically when None.
        classifier: name of the linear layer CAM reads; found automatically when None.
        gradcampp_eps: added to the Grad-CAM++ alpha denominator (0 = eq. 19 exactly;
            1e-6 reproduces pytorch-grad-cam).
        autocast_dtype: run the forward under ``torch.autocast`` with this dtype (e.g.
            bfloat16 on a GPU); maps are always computed in float32.
        anatomy: the model's anatomy when it is known already (skips the probe pass).

    The target layer's output may be channels-first, channels-last or a token sequence
    (:class:`audit.models.anatomy.FeatureLayout`); activations and gradients are read as
    (N, C, h, w) before the methods see them, as pytorch-grad-cam's ``reshape_transform`` does.
    """

    def __init__(
        self,
        model: nn.Module,
        input_size: tuple[int, int],
        target_layer: str | None = None,
        classifier: str | None = None,
        gradcampp_eps: float = 0.0,
        autocast_dtype: torch.dtype | None = None,
        anatomy: Anatomy | None = None,
    ) -> None:
        self.model = model.eval()
        self.input_size = input_size
        self.anatomy: Anatomy = anatomy or inspect_model(model, input_size, target_layer, classifier)
        self.settings = {"classifier": classifier, "gradcampp_eps": gradcampp_eps, "autocast_dtype": autocast_dtype}
        self.target_module = dict(model.named_modules())[self.anatomy.target_layer]
        self.autocast_dtype = autocast_dtype
        self.methods = [GradCAM(), GradCAMPlusPlus(eps=gradcampp_eps)]
        if self.anatomy.cam_head is not None:
            self.methods.insert(0, CAM(self.anatomy.cam_head))

    def like(self, model: nn.Module) -> ExplainEngine:
        """An engine with these settings, at this target layer, on another model of the same
        architecture (a copy whose parameters were re-initialised, for the sanity check)."""
        return ExplainEngine(
            model, self.input_size, self.anatomy.target_layer, anatomy=self.anatomy.on(model), **self.settings
        )

    @property
    def device(self) -> torch.device:
        parameter = next(self.model.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    def __call__(self, images: Tensor, targets: Tensor | None = None) -> Explanation:
        """Explain ``images`` (N, 3, H, W) for ``targets`` (N,), by default the predicted classes."""
        return self.explain_many(images, [targets])[0]

    def explain_many(self, images: Tensor, target_sets: list[Tensor | None]) -> list[Explanation]:
        """One forward, then one backward per target set (e.g. predicted and true classes).

        The backwards only run through the head, so a second target set costs almost nothing.
        """
        images = images.to(self.device, non_blocking=True)
        logits, activations = self._forward(images)
        explanations = []
        for index, targets in enumerate(target_sets):
            targets = self._resolve_targets(targets, logits)
            with torch.enable_grad():  # the caller may hold no_grad(); the head's graph needs the score too
                score = logits.float().gather(1, targets[:, None]).sum()
                last = index == len(target_sets) - 1
                (gradients,) = torch.autograd.grad(score, activations, retain_graph=not last)
            to_nchw = self.anatomy.layout.to_nchw
            explanations.append(
                self._explanation(
                    logits.detach().float(), targets, to_nchw(activations.detach()).float(), to_nchw(gradients).float()
                )
            )
        return explanations

    def predict(self, images: Tensor, chunk: int | None = None) -> Tensor:
        """Softmax probabilities (N, classes) in float32 from plain forwards, ``chunk`` images at a time."""
        images = images.to(self.device, non_blocking=True)
        chunk = chunk or max(1, images.shape[0])
        with torch.inference_mode(), self.autocast():
            return torch.cat([self.model(part).float().softmax(dim=1) for part in images.split(chunk)])

    def _forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        captured: list[Tensor] = []

        def open_graph_here(_module: nn.Module, _args: tuple, output: Tensor) -> Tensor:
            if captured:
                raise ModelAnatomyError(f"target layer {self.anatomy.target_layer!r} runs more than once per forward")
            torch.set_grad_enabled(True)  # restored when the enclosing no_grad() exits
            leaf = output.detach().requires_grad_(True)
            captured.append(leaf)
            return leaf.clone()  # the head may work in place (DenseNet's ReLU); the leaf stays intact

        handle = self.target_module.register_forward_hook(open_graph_here)
        try:
            with torch.no_grad(), self.autocast():
                logits = self.model(images)
        finally:
            handle.remove()
        if not captured:
            raise ModelAnatomyError(f"target layer {self.anatomy.target_layer!r} did not run in the forward pass")
        return logits, captured[0]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @staticmethod
    def _resolve_targets(targets: Tensor | None, logits: Tensor) -> Tensor:
        if targets is None:
            return logits.argmax(dim=1)
        targets = torch.as_tensor(targets, device=logits.device).long().reshape(-1)
        if targets.numel() != logits.shape[0]:
            raise ValueError(f"got {targets.numel()} targets for a batch of {logits.shape[0]} images")
        if targets.numel() and (targets.min() < 0 or targets.max() >= logits.shape[1]):
            raise ValueError(f"targets must be class indices in [0, {logits.shape[1]})")
        return targets

    def _explanation(self, logits: Tensor, targets: Tensor, activations: Tensor, gradients: Tensor) -> Explanation:
        maps: dict[str, Tensor | None] = {"cam": None, "gradcam": None, "gradcampp": None}
        empty: dict[str, Tensor | None] = dict(maps)
        notes = {} if self.anatomy.cam_head is not None else {"cam": self.anatomy.cam_note or "no CAM head"}
        with torch.no_grad():
            for method in self.methods:
                maps[method.name], empty[method.name] = normalize(method(activations, gradients, targets))
        return Explanation(logits, logits.softmax(dim=1), targets, maps, empty, notes)
