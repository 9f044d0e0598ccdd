"""``audit bench pipeline``: the whole job against a forward-only job, and its memory as data grows.

On one synthetic dataset and one random-init model, in one Ray session:

* throughput (images/s, wall clock of the job, actor start-up included) of ``audit run``
  computing the maps and their scores (decode, explain, metrics, Parquet; no evidence by
  intervention, no sanity check), of the same job computing predictions only, and of the job
  as ``audit run`` runs it by default (with the evidence by intervention and the sanity check);
* peak memory (PSS) of the driver and every Ray process it started (sampled every 0.5 s),
  for the default job on ``images`` and on ``4 x images`` images: streaming keeps it flat. The
  default job's throughput is timed on that second run.
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch

from audit.config import RunConfig
from audit.data.ham10000 import CLASSES
from audit.data.synthetic import DEFAULT_SPEC, SyntheticSpec, generate
from audit.models.checkpoint import save_random_checkpoint
from audit.pipeline.cluster import ray_cluster
from audit.pipeline.run import Execution, run_audit


@dataclass
class PipelineBenchResult:
    arch: str
    image_size: int
    batch_size: int
    images: int
    explain_images_per_s: float
    forward_images_per_s: float
    ratio_vs_forward: float
    default_images_per_s: float  # with the evidence by intervention and the sanity check
    default_vs_forward: float
    peak_rss_mb_small: float
    peak_rss_mb_large: float
    large_images: int
    memory_growth: float
    device: str

    def to_dict(self) -> dict:
        return asdict(self)


def bench_pipeline(
    arch: str = "resnet18", images: int = 256, image_size: int = 224, batch_size: int = 32, workdir: Path | None = None
) -> PipelineBenchResult:
    with tempfile.TemporaryDirectory(prefix="cam-audit-bench-", dir=workdir) as tmp:
        root = Path(tmp)
        small = generate(root / "small", SyntheticSpec(images=images, shortcuts=DEFAULT_SPEC.shortcuts, seed=1))
        large = generate(root / "large", SyntheticSpec(images=4 * images, shortcuts=DEFAULT_SPEC.shortcuts, seed=2))
        checkpoint = root / "model.pt"
        save_random_checkpoint(checkpoint, arch, CLASSES, (image_size, image_size))

        def config(data: Path, **changes) -> RunConfig:
            return RunConfig(
                dataset="synthetic",
                data_dir=str(data),
                model=str(checkpoint),
                out=str(root / "runs"),
                batch_size=batch_size,
                **changes,
            )

        maps_only = {"evidence": "none", "sanity_images": 0}
        with ray_cluster(None):
            _, explain_s = _timed(lambda: run_audit(config(large, **maps_only), Execution(progress=False)))
            _, forward_s = _timed(lambda: run_audit(config(large), Execution(progress=False, mode="forward")))
            small_peak, _ = _peak_rss(lambda: run_audit(config(small), Execution(progress=False)))
            large_peak, default_s = _peak_rss(lambda: run_audit(config(large), Execution(progress=False)))
    explain_rate, forward_rate, default_rate = (4 * images / t for t in (explain_s, forward_s, default_s))
    return PipelineBenchResult(
        arch=arch,
        image_size=image_size,
        batch_size=batch_size,
        images=4 * images,
        explain_images_per_s=round(explain_rate, 3),
        forward_images_per_s=round(forward_rate, 3),
        ratio_vs_forward=round(explain_rate / forward_rate, 3),
        default_images_per_s=round(default_rate, 3),
        default_vs_forward=round(default_rate / forward_rate, 3),
        peak_rss_mb_small=round(small_peak / 2**20, 1),
        peak_rss_mb_large=round(large_peak / 2**20, 1),
        large_images=4 * images,
        memory_growth=round(large_peak / small_peak, 3),
        device="cuda" if torch.cuda.is_available() else "cpu",
    )


def _timed(job):
    start = time.perf_counter()
    result = job()
    return result, time.perf_counter() - start


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
    return "\n".join(
        [
            f"pipeline benchmark: {result.arch} at {result.image_size}x{result.image_size}, batch {result.batch_size}, "
            f"{result.images} synthetic images, {result.device}",
            f"  audit run, maps and scores only              {result.explain_images_per_s:8.2f} images/s",
            f"  forward-only job                             {result.forward_images_per_s:8.2f} images/s",
            f"  throughput kept                              {100 * result.ratio_vs_forward:8.1f} %",
            f"  audit run as by default (evidence, sanity)   {result.default_images_per_s:8.2f} images/s"
            f"   ({100 * result.default_vs_forward:.1f} % of forward-only)",
            f"  peak memory, {result.large_images // 4:>6} images               {result.peak_rss_mb_small:8.1f} MB",
            f"  peak memory, {result.large_images:>6} images               {result.peak_rss_mb_large:8.1f} MB"
            f"   ({result.memory_growth:.2f}x)",
        ]
    )
