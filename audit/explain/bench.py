"""``audit bench engine``: what explaining costs, against a plain forward and against the peers.

In one process, on one random batch and one random-init model (any model spec: a torchvision,
timm or module architecture, built at the benchmark's input size), each repeat times in turn:
a plain no-grad forward; our three-method pass; the evidence by intervention for that pass
(occlusion counterfactuals with a central object mask, and the faithfulness measures: six
batched forwards of the batch); and, when installed, pytorch-grad-cam's
GradCAM and GradCAMPlusPlus and torchcam's CAM run one after another, the way a user
would call them (each builds its hooks, runs its own forward and backward, and returns its
maps). Interleaving spreads machine noise over all contenders alike; the figures are
medians over the repeats that follow the warm-up.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from audit.explain.engine import ExplainEngine
from audit.explain.evidence import gather_evidence
from audit.models.source import ModelRequest, resolve_model


@dataclass
class EngineBenchResult:
    arch: str
    batch_size: int
    image_size: int
    device: str
    dtype: str
    channels_last: bool
    repeats: int
    torch_threads: int
    forward_ms: float
    explain_ms: float
    ratio_vs_forward: float
    evidence_ms: float | None = None
    evidence_vs_forward: float | None = None
    peers_ms: float | None = None
    speedup_vs_peers: float | None = None
    peer_ms: dict[str, float] = field(default_factory=dict)
    machine: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def peers_available() -> bool:
    return all(importlib.util.find_spec(name) for name in ("pytorch_grad_cam", "torchcam"))


def bench_engine(
    arch: str = "resnet50",
    batch_size: int = 8,
    image_size: int = 224,
    repeats: int = 10,
    warmup: int = 2,
    device: str = "cpu",
    amp: bool = False,
    channels_last: bool = False,
    with_peers: bool = True,
    seed: int = 0,
) -> EngineBenchResult:
    """Time a plain forward, our pass and (optionally) the peers; return the medians."""
    torch.manual_seed(seed)
    target_device = torch.device(device)
    spec = arch if ":" in arch else f"torchvision:{arch}"  # a bare name is torchvision's, as in checkpoints
    request = ModelRequest(spec, classes=tuple(f"class{i}" for i in range(7)), input_size=(image_size, image_size))
    model = resolve_model(request).model.to(target_device)
    images = torch.randn(batch_size, 3, image_size, image_size, device=target_device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if amp else None
    engine = ExplainEngine(model, (image_size, image_size), autocast_dtype=dtype)

    def forward() -> None:
        with torch.inference_mode(), _autocast(target_device, dtype):
            model(images)

    explained = [engine(images)]
    masks = _central_masks(batch_size, image_size, target_device)
    contenders: dict[str, Callable[[], object]] = {
        "forward": forward,
        "explain": lambda: engine(images),
        "evidence": lambda: gather_evidence(engine, images, explained, ("occlusion", "faithfulness"), masks),
    }
    use_peers = with_peers and peers_available()
    if use_peers:
        contenders.update(_peer_contenders(model, engine, images))
    timings = _interleaved(contenders, repeats, warmup, target_device)
    forward_ms, explain_ms, evidence_ms = (timings.pop(name) for name in ("forward", "explain", "evidence"))
    result = EngineBenchResult(
        arch=arch,
        batch_size=batch_size,
        image_size=image_size,
        device=str(target_device),
        dtype="bfloat16 autocast" if amp else "float32",
        channels_last=channels_last,
        repeats=repeats,
        torch_threads=torch.get_num_threads(),
        forward_ms=forward_ms,
        explain_ms=explain_ms,
        ratio_vs_forward=explain_ms / forward_ms,
        evidence_ms=evidence_ms,
        evidence_vs_forward=evidence_ms / forward_ms,
        machine=_describe_machine(target_device),
    )
    if use_peers:
        result.peer_ms = timings
        result.peers_ms = sum(timings.values())
        result.speedup_vs_peers = result.peers_ms / explain_ms
    return result


def _central_masks(n: int, size: int, device: torch.device) -> torch.Tensor:
    """(n, size, size) discs over the middle third of the image: a lesion-sized object to hide."""
    ys, xs = torch.meshgrid(torch.arange(size, device=device), torch.arange(size, device=device), indexing="ij")
    disc = (ys - size / 2) ** 2 + (xs - size / 2) ** 2 <= (size / 6) ** 2
    return disc.expand(n, size, size)


def _peer_contenders(model: nn.Module, engine: ExplainEngine, images: torch.Tensor) -> dict[str, Callable[[], object]]:
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from torchcam.methods import CAM

    layer_name = engine.anatomy.target_layer
    layer = dict(model.named_modules())[layer_name]
    layout = engine.anatomy.layout
    reshape = None if layout.kind == "nchw" else layout.to_nchw  # its reshape_transform for tokens, NHWC

    def pytorch_grad_cam(cls: type) -> Callable[[], object]:
        def run() -> object:
            with cls(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
                return cam(images, targets=None)

        return run

    contenders = {
        "pytorch-grad-cam GradCAM": pytorch_grad_cam(GradCAM),
        "pytorch-grad-cam GradCAMPlusPlus": pytorch_grad_cam(GradCAMPlusPlus),
    }
    head = engine.anatomy.cam_head
    if head is not None and layout.kind == "nchw":  # torchcam reads (N, C, H, W) maps only

        def torchcam_cam() -> object:
            with CAM(model, target_layer=layer_name, fc_layer=head.name) as extractor, torch.no_grad():
                scores = model(images)
                return extractor(scores.argmax(dim=1).tolist(), scores)

        contenders["torchcam CAM"] = torchcam_cam
    return contenders


def _interleaved(
    contenders: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for step in range(warmup + repeats):
        for name, run in contenders.items():
            elapsed = _time_ms(run, device)
            if step >= warmup:
                samples[name].append(elapsed)
    return {name: statistics.median(values) for name, values in samples.items()}


def _time_ms(run: Callable[[], object], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    run()
    _synchronize(device)
    return (time.perf_counter() - start) * 1e3


def _describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()}, {os.cpu_count()} cpus"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)


def format_engine_bench(result: EngineBenchResult) -> str:
    """A few aligned lines for a terminal."""

    def row(label: str, ms: float, extra: str = "") -> str:
        return f"  {label:<36}{ms:9.1f} ms{extra}"

    lines = [
        f"engine benchmark: {result.arch}, batch {result.batch_size}, {result.image_size}x{result.image_size}, "
        f"{result.device} ({result.dtype}{', channels_last' if result.channels_last else ''}), "
        f"{result.torch_threads} threads, median of {result.repeats}",
        row("plain forward (no grad)", result.forward_ms),
        row("cam-audit, all three methods", result.explain_ms, f"   {result.ratio_vs_forward:.2f}x a forward"),
        row(
            "evidence (occlusion + faithfulness)", result.evidence_ms, f"   {result.evidence_vs_forward:.2f}x a forward"
        ),
    ]
    if result.peers_ms is None:
        lines.append("  peers not installed: pip install 'cam-audit[peers]' to compare")
        return "\n".join(lines)
    lines += [row(f"  {name}", ms) for name, ms in result.peer_ms.items()]
    lines.append(
        row("peers, one after another", result.peers_ms, f"   cam-audit is {result.speedup_vs_peers:.2f}x faster")
    )
    return "\n".join(lines)
