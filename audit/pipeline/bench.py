"""``audit bench pipeline``: the whole job against a forward-only job, its start-up, its decoding, and its memory.

On one synthetic dataset of HAM10000-sized photographs (600x450 JPEGs with PNG lesion masks, by
default) and one random-init model, in one Ray session:

* throughput (images/s) of ``audit run`` computing the maps and their scores (read, decode,
  explain, metrics, Parquet; no evidence by intervention, no sanity check), of the same job
  computing predictions only, and of the job as ``audit run`` runs it by default (with the
  evidence by intervention and the sanity check). End to end is the job's wall clock, actor
  start-up included; steady state is the job's rate after its actors' first batch;
* start-up: seconds from Ray being up to the first written batch (run.json ``attempts``), after
  an untimed small run has started Ray's worker processes (a fresh ``audit run`` also pays
  ``ray.init``, which the CLI's own timings show);
* decoding, per image, on one core: today's read stage plus the device decoder
  (:mod:`audit.data.device_decode`) with the mask cache warm and cold, against Pillow decoding
  and resizing image and mask (the read stage before the device decoder);
* peak memory (PSS) of the driver and every Ray process it started (sampled every 0.5 s), for
  the default job on ``images`` and on ``4 x images`` images: streaming keeps it flat;
* GPU utilisation (mean of ``nvidia-smi`` samples) during the maps-and-scores job, where a GPU is present.

The datasets' masks are cached before the timed jobs (the nightly audit of an unchanged dataset);
the cold cache is measured in the decoding figures. The cache lives in the benchmark's temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
import torch

from audit.config import RunConfig
from audit.data.decode import decode_image, decode_mask, resize_mask, resize_rgb
from audit.data.ham10000 import CLASSES
from audit.data.mask_cache import CACHE_ENV
from audit.data.synthetic import DEFAULT_SPEC, SyntheticSpec, generate
from audit.models.checkpoint import save_random_checkpoint
from audit.pipeline.cluster import ray_cluster
from audit.pipeline.read import read_batch
from audit.pipeline.run import Execution, run_audit
from audit.pipeline.stages import decode_rows

HAM_SIZE = (450, 600)  # height, width of a HAM10000 photograph
DECODE_SAMPLE = 64


@dataclass
class PipelineBenchResult:
    arch: str
    image_size: int
    photo_size: list[int]  # the dataset's images, height x width
    batch_size: int | None  # None: the device's default (run.json records it)
    images: int
    explain_images_per_s: float
    explain_steady_images_per_s: float | None
    forward_images_per_s: float
    forward_steady_images_per_s: float | None
    ratio_vs_forward: float
    first_batch_s: float | None
    default_images_per_s: float  # with the evidence by intervention and the sanity check
    default_vs_forward: float
    decode_ms_per_image: float
    decode_cold_cache_ms_per_image: float
    pillow_decode_ms_per_image: float
    peak_rss_mb_small: float
    peak_rss_mb_large: float
    large_images: int
    memory_growth: float
    gpu_utilisation: float | None
    device: str

    def to_dict(self) -> dict:
        return asdict(self)


def bench_pipeline(
    arch: str = "resnet18",
    images: int = 256,
    image_size: int = 224,
    batch_size: int | None = None,
    photo_size: tuple[int, int] = HAM_SIZE,
    workdir: Path | None = None,
) -> PipelineBenchResult:
    with tempfile.TemporaryDirectory(prefix="cam-audit-bench-", dir=workdir) as tmp:
        root = Path(tmp)
        previous_cache = os.environ.get(CACHE_ENV)
        os.environ[CACHE_ENV] = str(root / "cache")  # before Ray starts: its workers inherit it
        try:
            return _bench(arch, images, image_size, batch_size, tuple(photo_size), root)
        finally:
            if previous_cache is None:
                os.environ.pop(CACHE_ENV, None)
            else:
                os.environ[CACHE_ENV] = previous_cache


def _bench(arch, images, image_size, batch_size, photo_size, root: Path) -> PipelineBenchResult:
    h, w = photo_size
    spec = {"height": h, "width": w, "shortcuts": DEFAULT_SPEC.shortcuts}
    small = generate(root / "small", SyntheticSpec(images=images, seed=1, **spec))
    large = generate(root / "large", SyntheticSpec(images=4 * images, seed=2, **spec))
    checkpoint = root / "model.pt"
    save_random_checkpoint(checkpoint, arch, CLASSES, (image_size, image_size))
    input_size = (image_size, image_size)
    decoding = _decoding(large, input_size)
    for data in (small, large):  # the timed jobs read masks from the cache, as a nightly audit does
        for rows in _rows(data, None):
            read_batch(rows, input_size, "auto")

    def config(data: Path, **changes) -> RunConfig:
        return RunConfig(
            dataset="synthetic",
            data_dir=str(data),
            model=str(checkpoint),
            out=str(root / "runs"),
            batch_size=batch_size,
            report=False,
            **changes,
        )

    maps_only = {"evidence": "none", "sanity_images": 0}
    gpu = _GpuSampler()
    with ray_cluster(None):
        # Untimed: Ray's first worker processes start here, not inside whichever job comes first.
        run_audit(config(small, limit=min(images, batch_size or 32), **maps_only), Execution(progress=False))
        with gpu:
            explain_dir, explain_s = _timed(lambda: run_audit(config(large, **maps_only), Execution(progress=False)))
        forward_dir, forward_s = _timed(lambda: run_audit(config(large), Execution(progress=False, mode="forward")))
        small_peak, _ = _peak_rss(lambda: run_audit(config(small), Execution(progress=False)))
        large_peak, default_s = _peak_rss(lambda: run_audit(config(large), Execution(progress=False)))
    explain_attempt, forward_attempt = (_first_attempt(d) for d in (explain_dir, forward_dir))
    device = json.loads((explain_dir / "run.json").read_text())["execution"]["device"]
    explain_rate, forward_rate, default_rate = (4 * images / t for t in (explain_s, forward_s, default_s))
    return PipelineBenchResult(
        arch=arch,
        image_size=image_size,
        photo_size=[h, w],
        batch_size=batch_size,
        images=4 * images,
        explain_images_per_s=round(explain_rate, 3),
        explain_steady_images_per_s=explain_attempt.get("steady_images_per_s"),
        forward_images_per_s=round(forward_rate, 3),
        forward_steady_images_per_s=forward_attempt.get("steady_images_per_s"),
        ratio_vs_forward=round(explain_rate / forward_rate, 3),
        first_batch_s=explain_attempt.get("first_batch_s"),
        default_images_per_s=round(default_rate, 3),
        default_vs_forward=round(default_rate / forward_rate, 3),
        **decoding,
        peak_rss_mb_small=round(small_peak / 2**20, 1),
        peak_rss_mb_large=round(large_peak / 2**20, 1),
        large_images=4 * images,
        memory_growth=round(large_peak / small_peak, 3),
        gpu_utilisation=gpu.mean(),
        device=device,
    )


def _rows(data: Path, limit: int | None, batch: int = 32) -> list[dict]:
    """The dataset's rows as the read stage takes them, in batches."""
    from audit.data import load_dataset

    frame = load_dataset("synthetic", data).manifest.head(limit)
    columns = ("image_id", "path", "mask_path")
    return [
        {c: frame[c].iloc[start : start + batch].to_numpy(dtype=object) for c in columns}
        for start in range(0, len(frame), batch)
    ]


def _decoding(data: Path, input_size: tuple[int, int]) -> dict:
    """Milliseconds per image, one core: read stage + device decoder (mask cache cold, then warm),
    and Pillow decoding and resizing image and mask as the read stage did before the device decoder."""
    batches = _rows(data, DECODE_SAMPLE)
    n = sum(len(b["image_id"]) for b in batches)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timings = []
        for _ in range(2):  # the first pass fills the mask cache
            start = time.perf_counter()
            for rows in batches:
                decode_rows(read_batch(rows, input_size, "auto"), input_size, device)
            if device == "cuda":
                torch.cuda.synchronize()
            timings.append((time.perf_counter() - start) / n * 1e3)
        start = time.perf_counter()
        for rows in batches:
            for path, mask_path in zip(rows["path"], rows["mask_path"]):
                rgb = decode_image(path)
                resize_rgb(rgb, input_size)
                resize_mask(decode_mask(mask_path, rgb.shape[:2]), input_size)
        pillow = (time.perf_counter() - start) / n * 1e3
    finally:
        torch.set_num_threads(threads)
    return {
        "decode_cold_cache_ms_per_image": round(timings[0], 3),
        "decode_ms_per_image": round(timings[1], 3),
        "pillow_decode_ms_per_image": round(pillow, 3),
    }


def _first_attempt(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())["attempts"][0]


def _timed(job):
    start = time.perf_counter()
    result = job()
    return result, time.perf_counter() - start


class _GpuSampler:
    """Mean GPU utilisation (%) over the block, from ``nvidia-smi`` every 0.5 s; None without a GPU."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.enabled = torch.cuda.is_available() and shutil.which("nvidia-smi") is not None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> _GpuSampler:
        if self.enabled:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.enabled:
            self.thread.join()

    def _sample(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self.stop.wait(0.5):
            try:
                values = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout.split()
                self.samples.append(float(np.mean([float(v) for v in values])))
            except (OSError, ValueError, subprocess.SubprocessError):
                continue

    def mean(self) -> float | None:
        return round(float(np.mean(self.samples)), 1) if self.samples else None


def _peak_rss(job) -> tuple[float, float]:
    """Peak of the summed RSS of this process and all its descendants while ``job`` runs, and the
    job's wall-clock seconds (sampling every 0.5 s costs the job next to nothing)."""
    peak = 0.0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss())
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        _, seconds = _timed(job)
    finally:
        stop.set()
        sampler.join()
    return peak, seconds


def _tree_rss() -> float:
    """Proportional set size (shared pages split between their users), so libraries mapped by
    every worker are not counted once per worker."""
    me = psutil.Process()
    total = 0
    for process in [me, *me.children(recursive=True)]:
        try:
            total += process.memory_full_info().pss
        except (psutil.Error, AttributeError):
            continue
    return float(total)


def format_pipeline_bench(result: PipelineBenchResult) -> str:
    def rate(value: float | None) -> str:
        return f"{value:8.2f}" if value is not None else "       -"

    h, w = result.photo_size
    batch = result.batch_size or "the device's default"
    gpu = f"{result.gpu_utilisation:.0f} %" if result.gpu_utilisation is not None else "no GPU"
    return "\n".join(
        [
            f"pipeline benchmark: {result.arch} at {result.image_size}x{result.image_size}, batch {batch}, "
            f"{result.images} synthetic {w}x{h} JPEGs with masks, {result.device}",
            "                                               end to end   steady state (images/s)",
            f"  audit run, maps and scores only              {rate(result.explain_images_per_s)}     "
            f"{rate(result.explain_steady_images_per_s)}",
            f"  forward-only job                             {rate(result.forward_images_per_s)}     "
            f"{rate(result.forward_steady_images_per_s)}",
            f"  throughput kept                              {100 * result.ratio_vs_forward:8.1f} %",
            f"  audit run as by default (evidence, sanity)   {rate(result.default_images_per_s)}"
            f"   ({100 * result.default_vs_forward:.1f} % of forward-only)",
            f"  first batch after Ray is up                  {rate(result.first_batch_s)} s",
            f"  decode per image, one core                   {result.decode_ms_per_image:8.2f} ms"
            f"   (mask cache cold {result.decode_cold_cache_ms_per_image:.2f} ms; "
            f"Pillow, image and mask {result.pillow_decode_ms_per_image:.2f} ms)",
            f"  GPU utilisation, maps and scores job         {gpu:>8}",
            f"  peak memory, {result.large_images // 4:>6} images               {result.peak_rss_mb_small:8.1f} MB",
            f"  peak memory, {result.large_images:>6} images               {result.peak_rss_mb_large:8.1f} MB"
            f"   ({result.memory_growth:.2f}x)",
        ]
    )
