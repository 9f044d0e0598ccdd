"""The model-randomization sanity check (Adebayo et al., "Sanity checks for saliency maps", 2018).

A map that explains a decision must change when the decision's parameters are destroyed. The
check re-initialises the model's parameters cascading from the top
(:func:`audit.models.anatomy.randomization_cascade`: the classifier first, then the target
layer's blocks last to first, then one block beyond) and, after each step, explains the same
images for the trained model's predicted classes. Its measure, per method and step:

.. math:: s = \\operatorname{mean}_{\\text{seeds}} \\; \\operatorname{median}_{\\text{images}} \\;
          \\rho_{\\text{Spearman}}(L_{\\text{trained}}, L_{\\text{randomized}})

on the maps at the target layer's grid (Guided Grad-CAM and Guided Grad-CAM++ on the per-pixel
magnitude at the input's size). An image whose trained map is empty is left out; a randomized
map that became empty shares nothing with the trained one and counts as 0. One seed is noise
(a single re-initialisation's correlation can swing from -0.4 to 0.6), so at least three fixed
seeds are averaged. A method *fails* when its similarity after re-initialising the classifier
alone (step 0) is at or above the threshold (``sanity_similarity_max``, 0.5): its maps do not
depend on what the classifier decides. On a global-average-pool head Grad-CAM++ is the usual
case: there ``dY_c/dA = W[c, k] / (h w)`` everywhere, its channel weight is
``ReLU(W[c, k]) / (2 + W[c, k] mean(A_k))``, and the map is a positive mix of activations that
any random classifier with some positive weights reproduces.

Re-initialisation calls each module's ``reset_parameters`` (running statistics too, for batch
norms) on a CPU copy under a fixed seed, so a seed gives the same weights on any device.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from audit.explain.engine import ExplainEngine, Explanation
from audit.explain.guided import GUIDED, GuidedBackprop, guided_magnitude, guided_maps, guided_note
from audit.explain.methods import METHODS
from audit.explain.metrics import consensus, spearman
from audit.models.anatomy import randomization_cascade

SANITY_FILE = "sanity.json"  # in the run directory
SEEDS = (0, 1, 2)
SANITY_METHODS = (*METHODS, "consensus", *GUIDED)
GUIDED_IMAGES = 8  # guided maps cost a full backward per image: they are checked on the first few


@dataclass
class SanityStep:
    randomized: list[str]
    similarity: dict[str, float | None]


@dataclass
class SanityResult:
    """What ``sanity.json`` holds; the verdict is the report's, from these similarities."""

    images: int
    seeds: list[int]
    steps: list[SanityStep]
    guided_images: int
    notes: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def verdicts(steps: list[dict], threshold: float) -> dict[str, str]:
    """``pass`` or ``fail`` per method from step 0 (the classifier alone), for the methods measured there."""
    if not steps:
        return {}
    return {
        method: "fail" if value >= threshold else "pass"
        for method, value in steps[0]["similarity"].items()
        if value is not None
    }


def randomize(module: nn.Module, seed: int) -> None:
    """Re-initialise every parameter (and batch-norm statistic) under ``module``, reproducibly on any device."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = copy.deepcopy(module).to("cpu")
        for part in fresh.modules():
            if hasattr(part, "reset_parameters"):
                part.reset_parameters()
            if hasattr(part, "reset_running_stats"):
                part.reset_running_stats()
    module.load_state_dict(fresh.state_dict())


class SanityCheck:
    """Cascading randomization of one engine's model at its target layer (see the module's docstring).

    Args:
        engine: the trained model's engine; its model is not modified (the check works on copies).
        seeds: the re-initialisations averaged.
        chunk: images explained at once.
        guided_images: how many of the images the guided maps are checked on.
    """

    def __init__(
        self,
        engine: ExplainEngine,
        seeds: tuple[int, ...] = SEEDS,
        chunk: int = 32,
        guided_images: int = GUIDED_IMAGES,
    ) -> None:
        self.engine, self.model = engine, engine.model
        self.cascade = randomization_cascade(self.model, engine.input_size, engine.anatomy.target_layer)
        self.seeds, self.chunk, self.guided_images = tuple(seeds), chunk, guided_images
        self.guided_note = guided_note(self.model)

    def __call__(self, images: Tensor) -> SanityResult:
        """Run the check on ``images`` (N, 3, H, W), normalised as the model expects."""
        began = time.perf_counter()
        trained = self._maps(self.engine, images, None)
        targets = trained.pop("targets")
        guided_count = 0 if self.guided_note else min(self.guided_images, images.shape[0])
        trained.update(self._guided(self.model, self.engine, images[:guided_count], targets[:guided_count]))
        per_step: list[dict[str, list[float]]] = [{} for _ in self.cascade]
        for seed in self.seeds:
            model = copy.deepcopy(self.model)
            modules = dict(model.named_modules())
            done: set[str] = set()
            for step, randomized in enumerate(self.cascade):
                for offset, name in enumerate(randomized):
                    if name not in done:
                        randomize(modules[name], seed * 1000 + offset)
                        done.add(name)
                engine = self.engine.like(model)
                maps = self._maps(engine, images, targets)
                maps.update(self._guided(model, engine, images[:guided_count], targets[:guided_count]))
                for method, value in _similarities(trained, maps).items():
                    per_step[step].setdefault(method, []).append(value)
        steps = [
            SanityStep(list(randomized), {m: _mean(values.get(m, [])) for m in SANITY_METHODS})
            for randomized, values in zip(self.cascade, per_step)
        ]
        notes = {name: self.guided_note for name in GUIDED} if self.guided_note else {}
        if self.engine.anatomy.cam_head is None:
            notes["cam"] = self.engine.anatomy.cam_note or "no CAM head"
        return SanityResult(
            images=int(images.shape[0]),
            seeds=list(self.seeds),
            steps=steps,
            guided_images=guided_count,
            notes=notes,
            seconds=round(time.perf_counter() - began, 3),
        )

    def _maps(self, engine: ExplainEngine, images: Tensor, targets: Tensor | None) -> dict:
        """Maps per method and consensus, (N, h*w) with their empty flags, for ``targets`` (default: predicted)."""
        parts: list[Explanation] = []
        for start in range(0, images.shape[0], self.chunk):
            batch_targets = None if targets is None else targets[start : start + self.chunk]
            parts.append(engine(images[start : start + self.chunk], batch_targets))
        out: dict = {"targets": torch.cat([p.targets for p in parts])}
        for method in METHODS:
            if parts[0].maps[method] is not None:
                out[method] = (
                    torch.cat([p.maps[method] for p in parts]),
                    torch.cat([p.empty[method] for p in parts]),
                )
        available = {m: out[m][0] for m in METHODS if m in out}
        out["consensus"] = consensus(available)
        return out

    def _guided(self, model: nn.Module, engine: ExplainEngine, images: Tensor, targets: Tensor) -> dict:
        if images.shape[0] == 0:
            return {}
        explained = engine(images, targets)
        gradients = GuidedBackprop(model)(images.to(engine.device), targets)
        out = {}
        for name, guided in guided_maps(gradients, explained.maps).items():
            if guided is not None:
                magnitude = guided_magnitude(guided)
                out[name] = (magnitude, magnitude.flatten(1).amax(dim=1) <= 0)
        return out


def _similarities(trained: dict, randomized: dict) -> dict[str, float]:
    """Median over images of the Spearman correlation of each method's trained and randomized maps."""
    out = {}
    for method in SANITY_METHODS:
        if method not in trained or method not in randomized:
            continue
        (before, before_empty), (after, after_empty) = trained[method], randomized[method]
        rho, defined = spearman(before.flatten(1).float(), after.flatten(1).float())
        rho = torch.where(after_empty, torch.zeros_like(rho), rho)  # a map that vanished kept nothing
        keep = ~before_empty & (defined | after_empty)
        if keep.any():
            out[method] = float(np.median(rho[keep].cpu().numpy()))
    return out


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None
