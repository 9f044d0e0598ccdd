"""The ``audit`` command line: parses options, calls the library, maps errors to exit codes.

Exit codes: 0 success; 1 an audit gate failed; 2 bad input (one-line reason on stderr).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from audit import __version__
from audit.errors import AuditError

if TYPE_CHECKING:
    from audit.report import ReportResult


class AuditGroup(click.Group):
    """Turns :class:`AuditError` into a one-line message and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AuditError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=AuditGroup)
@click.version_option(__version__, prog_name="audit")
def main() -> None:
    """cam-audit: check that an image classifier looks at the object, not at a shortcut."""


def _require_cuda(device: str | None) -> None:
    """A --device naming CUDA on a machine without it is bad input, not a traceback."""
    if device and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise AuditError(f"--device {device}: no CUDA device is available")


def threshold_options(command):
    """One option per report threshold (``--off-object-fail`` ...), collected into ``thresholds``."""
    from dataclasses import fields

    from audit.report.thresholds import HELP, Thresholds

    for spec in reversed(fields(Thresholds)):
        option = click.option(
            f"--{spec.name.replace('_', '-')}",
            f"threshold_{spec.name}",
            type=int if spec.type == "int" else float,
            default=None,
            help=f"{HELP[spec.name]} [default: {spec.default}]",
        )
        command = option(command)
    return command


def _thresholds(options: dict) -> dict:
    """The threshold options given on the command line, by threshold name."""
    prefix = "threshold_"
    return {k[len(prefix) :]: v for k, v in options.items() if k.startswith(prefix) and v is not None}


FAIL_ON = click.option(
    "--fail-on",
    type=click.Choice(["warn", "fail"]),
    default=None,
    help="exit 1 when a class's status reaches this level",
)
GALLERY = click.option(
    "--gallery", default=8, show_default=True, type=click.IntRange(min=0), help="worst cases shown per flagged class"
)


def _report(run_dir: Path, overrides: dict, gallery: int, stream) -> ReportResult:
    from audit.report import build_report

    result = build_report(run_dir, overrides, gallery=gallery)
    for line in result.headline():
        click.echo(line, file=stream)
    return result


@main.command("run")
@click.option("--dataset", "name", type=click.Choice(["ham10000", "imagefolder", "manifest", "synthetic"]))
@click.option("--data-dir", type=click.Path(path_type=Path), help="dataset folder (for manifest: the CSV/Parquet file)")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="cam-audit/1 checkpoint (.pt)")
@click.option(
    "--out",
    default="reports",
    show_default=True,
    type=click.Path(path_type=Path),
    help="runs are written to OUT/<run_id>/",
)
@click.option(
    "--targets",
    type=click.Choice(["pred", "label", "both"]),
    default="pred",
    show_default=True,
    help="classes to explain",
)
@click.option("--address", default=None, help="join a Ray cluster (auto, ray://host:10001); default: start a local one")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--limit", default=None, type=click.IntRange(min=1), help="only the first N images, for a quick look")
@click.option(
    "--masks",
    type=click.Choice(["auto", "provided", "estimate", "none"]),
    default="auto",
    show_default=True,
    help="auto: a row's own mask, else an estimated lesion mask",
)
@click.option("--target-layer", default=None, help="module to explain (default: found automatically)")
@click.option("--classifier", default=None, help="linear layer CAM reads (default: found automatically)")
@click.option(
    "--actors", default=None, type=click.IntRange(min=1), help="explain actors (default: one per GPU, else per node)"
)
@click.option(
    "--resume", "resume_dir", type=click.Path(path_type=Path, file_okay=False), help="finish an interrupted run"
)
@click.option("--report/--no-report", default=True, show_default=True, help="end with the report stage")
@click.option("--batch-delay", default=0.0, type=float, hidden=True, help="tests: seconds of sleep per batch")
@FAIL_ON
@GALLERY
@threshold_options
def run_command(
    name,
    data_dir,
    checkpoint,
    out,
    targets,
    address,
    batch_size,
    limit,
    masks,
    target_layer,
    classifier,
    actors,
    resume_dir,
    report,
    batch_delay,
    fail_on,
    gallery,
    **options,
) -> None:
    """Explain every image of a dataset with CAM, Grad-CAM and Grad-CAM++ on a Ray cluster.

    Writes OUT/<run_id>/ with run.json, manifest.parquet and explanations/ (one row per image
    and target, ok or error with a reason), then the report stage's summary.json and
    report.html, and prints the run directory as the last line. Exits 1 when --fail-on is
    reached. Ctrl-C stops cleanly; `audit run --resume RUN_DIR` then finishes without recomputing.
    """
    from audit.config import RunConfig
    from audit.pipeline.run import Execution, resume_audit, run_audit

    execution = Execution(batch_delay=batch_delay)
    try:
        if resume_dir is not None:
            run_dir = resume_audit(resume_dir, execution)
        else:
            if name is None or checkpoint is None:
                raise AuditError("audit run needs --dataset and --checkpoint (or --resume RUN_DIR)")
            config = RunConfig(
                dataset=name,
                checkpoint=str(checkpoint),
                data_dir=str(data_dir) if data_dir else None,
                out=str(out),
                targets=targets,
                address=address,
                batch_size=batch_size,
                limit=limit,
                masks=masks,
                target_layer=target_layer,
                classifier=classifier,
                actors=actors,
                thresholds=_thresholds(options),
            )
            run_dir = run_audit(config, execution)
    except KeyboardInterrupt:
        click.echo("interrupted: finish the run with `audit run --resume RUN_DIR`", err=True)
        sys.exit(130)
    result = _report(run_dir, _thresholds(options), gallery, sys.stderr) if report else None
    if result is not None:
        click.echo(f"report: {result.html_path}", err=True)
    click.echo(run_dir)
    if fail_on and result is not None and result.reaches(fail_on):
        sys.exit(1)


@main.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False))
@FAIL_ON
@GALLERY
@click.option("--json", "as_json", is_flag=True, help="print summary.json instead of the verdict lines")
@threshold_options
def report_command(run_dir: Path, fail_on: str | None, gallery: int, as_json: bool, **options) -> None:
    """Aggregate a run per class, flag it, and write summary.json and report.html into RUN_DIR.

    Reads only the columns it needs and recomputes no map, so thresholds can change freely.
    Thresholds not given here are the run's own (its config), else the defaults. Exits 0 when
    no class reaches --fail-on, 1 when one does, 2 when RUN_DIR is not a readable run.
    """
    result = _report(run_dir, _thresholds(options), gallery, sys.stderr if as_json else sys.stdout)
    click.echo(json.dumps(result.summary, indent=2) if as_json else f"report: {result.html_path}")
    if fail_on and result.reaches(fail_on):
        sys.exit(1)


@main.group()
def bench() -> None:
    """Measure speed: the explanation engine against a plain forward and the peer libraries."""


@bench.command("engine")
@click.option("--arch", default="resnet50", show_default=True, help="torchvision architecture (random weights).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(min=32))
@click.option("--repeats", default=10, show_default=True, type=click.IntRange(min=1), help="timed repeats")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(min=0), help="untimed repeats first")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
@click.option("--amp/--no-amp", default=None, help="bfloat16 autocast (default: on for cuda)")
@click.option("--channels-last/--no-channels-last", default=None, help="(default: on for cuda)")
@click.option("--peers/--no-peers", default=True, show_default=True, help="also time pytorch-grad-cam and torchcam")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def bench_engine_command(
    arch: str,
    batch_size: int,
    image_size: int,
    repeats: int,
    warmup: int,
    device: str | None,
    amp: bool | None,
    channels_last: bool | None,
    peers: bool,
    as_json: bool,
) -> None:
    """Time one batch: plain forward vs our three-method pass vs the peers one after another."""
    import torch

    from audit.explain.bench import bench_engine, format_engine_bench

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    _require_cuda(device)
    on_gpu = device.startswith("cuda")
    result = bench_engine(
        arch=arch,
        batch_size=batch_size,
        image_size=image_size,
        repeats=repeats,
        warmup=warmup,
        device=device,
        amp=on_gpu if amp is None else amp,
        channels_last=on_gpu if channels_last is None else channels_last,
        with_peers=peers,
    )
    click.echo(json.dumps(result.to_dict()) if as_json else format_engine_bench(result))


@bench.command("pipeline")
@click.option("--arch", default="resnet18", show_default=True, help="torchvision architecture (random weights)")
@click.option(
    "--images",
    default=256,
    show_default=True,
    type=click.IntRange(min=8),
    help="the small dataset; the large one is 4x",
)
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(min=32))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def bench_pipeline_command(arch: str, images: int, image_size: int, batch_size: int, as_json: bool) -> None:
    """Throughput of the whole job vs a forward-only job, and peak memory at two dataset sizes."""
    from audit.pipeline.bench import bench_pipeline, format_pipeline_bench

    result = bench_pipeline(arch=arch, images=images, image_size=image_size, batch_size=batch_size)
    click.echo(json.dumps(result.to_dict()) if as_json else format_pipeline_bench(result))


DATASET_CHOICE = click.Choice(["ham10000", "imagefolder", "manifest", "synthetic"])


@main.group()
def data() -> None:
    """Inspect datasets and generate the synthetic one."""


@data.command("check")
@click.option("--dataset", "name", type=DATASET_CHOICE, required=True)
@click.option("--data-dir", type=click.Path(path_type=Path), help="dataset folder (for manifest: the CSV/Parquet file)")
@click.option("--mask-dir", type=click.Path(path_type=Path), help="imagefolder only: parallel tree of masks")
@click.option("--deep", is_flag=True, help="decode every image fully (finds truncated files; slower)")
@click.option(
    "--estimate-masks",
    default=0,
    type=click.IntRange(min=0),
    help="score estimated masks against provided ones on N images",
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def data_check(
    name: str, data_dir: Path | None, mask_dir: Path | None, deep: bool, estimate_masks: int, as_json: bool
) -> None:
    """Validate a dataset before a long job: counts, missing and unreadable files, masks, lesions.

    Exits 2 when the dataset cannot be used (nothing readable, no metadata, no rows).
    """
    from audit.data import load_dataset
    from audit.data.check import check_dataset, format_report

    report = check_dataset(load_dataset(name, data_dir, mask_dir=mask_dir), deep=deep, estimate_masks=estimate_masks)
    click.echo(json.dumps(report.to_dict()) if as_json else format_report(report))
    if not report.usable:
        raise AuditError(f"dataset {name} at {report.root} is unusable: none of its {report.rows} images can be read")


@data.command("synth")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="folder to write (HAM10000 layout)")
@click.option("--images", default=700, show_default=True, type=click.IntRange(min=1))
@click.option("--height", default=96, show_default=True, type=click.IntRange(min=32))
@click.option("--width", default=128, show_default=True, type=click.IntRange(min=32))
@click.option(
    "--shortcut",
    "shortcuts",
    multiple=True,
    metavar="CLASS=KIND[:CORRELATION[:LEAK]][:only]",
    help="plant an artefact, e.g. df=patch:1.0:0:only or mel=ruler:0.8:0.1 (kinds: patch, ruler, ink, dark_corners)",
)
@click.option("--seed", default=0, show_default=True, type=int)
def data_synth(out: Path, images: int, height: int, width: int, shortcuts: tuple[str, ...], seed: int) -> None:
    """Write a synthetic HAM10000-layout dataset with planted shortcuts; prints the folder."""
    from audit.data.synthetic import SyntheticSpec, generate, parse_shortcut

    try:
        planted = dict(parse_shortcut(text) for text in shortcuts)
        spec = SyntheticSpec(images=images, height=height, width=width, shortcuts=planted, seed=seed)
    except ValueError as exc:
        raise AuditError(str(exc)) from exc
    click.echo(generate(out, spec))


@main.command("train")
@click.option("--dataset", "name", type=DATASET_CHOICE, required=True)
@click.option("--data-dir", type=click.Path(path_type=Path), help="dataset folder (for manifest: the CSV/Parquet file)")
@click.option("--arch", required=True, help="torchvision architecture, e.g. resnet50")
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(min=32), help="square input side")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True), help="peak rate")
@click.option(
    "--weights",
    default="imagenet",
    show_default=True,
    help="imagenet (torchvision's local cache), none (random init), or a weights file",
)
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0), help="data loader processes")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True, help="checkpoint to write")
def train_command(
    name, data_dir, arch, image_size, epochs, batch_size, lr, weights, workers, seed, device, out
) -> None:
    """Fine-tune a torchvision classifier; writes OUT (a cam-audit checkpoint) and OUT's .eval.json.

    Splits by lesion group (no lesion on both sides), stratified by class; class-weighted loss;
    keeps the epoch with the best validation macro-F1 and evaluates it on the test split.
    """
    from audit.models.checkpoint import classification_architectures
    from audit.models.train import TrainConfig, train_model

    if arch not in classification_architectures():
        raise AuditError(f"unknown architecture {arch!r}: expected a torchvision classification model")
    _require_cuda(device)
    config = TrainConfig(
        dataset=name,
        data_dir=str(data_dir) if data_dir else None,
        arch=arch,
        out=str(out),
        image_size=image_size,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weights=weights,
        workers=workers,
        seed=seed,
        device=device,
    )
    result = train_model(config)
    click.echo(f"evaluation: {result.evaluation}", err=True)
    click.echo(result.checkpoint)


@main.command("demo")
@click.option(
    "--out", default="reports/demo", show_default=True, type=click.Path(path_type=Path), help="data, model and runs"
)
@click.option("--images", default=700, show_default=True, type=click.IntRange(min=60), hidden=True)
@click.option("--epochs", default=6, show_default=True, type=click.IntRange(min=1), hidden=True)
@click.option("--image-size", default=128, show_default=True, type=click.IntRange(min=32), hidden=True)
def demo_command(out: Path, images: int, epochs: int, image_size: int) -> None:
    """Audit a model trained on synthetic lesions where one class's only signal is a planted patch.

    Generates the data, trains a small model on the CPU, runs the audit on a local Ray instance
    and writes the report; says in plain lines what it found. A second run reuses the data and
    the model. Exits 0 when the report flags the planted class off-object and no other class,
    1 otherwise.
    """
    from audit.demo import DemoSettings, run_demo

    result = run_demo(out, DemoSettings(images=images, epochs=epochs, image_size=image_size))
    for line in result.lines():
        click.echo(line)
    if not result.ok:
        sys.exit(1)


@main.group()
def fetch() -> None:
    """Download public datasets."""


@fetch.command("ham10000")
@click.option(
    "--dest", type=click.Path(path_type=Path), help="default: $AUDIT_DATA_DIR/ham10000 or ~/.cache/cam-audit/ham10000"
)
@click.option("--base-url", default=None, hidden=True, help="Dataverse server (tests point this at a local server)")
def fetch_ham10000_command(dest: Path | None, base_url: str | None) -> None:
    """Download HAM10000 (images, metadata, lesion masks) from Harvard Dataverse, DOI 10.7910/DVN/DBW86T.

    Resumes partial downloads, verifies sizes and MD5 checksums, extracts the archives, and does
    nothing the second time. Prints the folder, which `--dataset ham10000` then finds by default.
    """
    from audit.data.fetch import DATAVERSE_URL, default_data_dir, fetch_ham10000

    dest = dest or default_data_dir("ham10000")
    with _ByteProgress() as progress:
        fetch_ham10000(dest, base_url=base_url or DATAVERSE_URL, progress=progress)
    click.echo(dest)


class _ByteProgress:
    """One click progress bar per file, on stderr (readable in a terminal and in a CI log)."""

    def __init__(self) -> None:
        self._bar = None
        self._name: str | None = None
        self._done = 0

    def __call__(self, name: str, done: int, total: int) -> None:
        if name != self._name:
            self.close()
            self._name, self._done = name, 0
            self._bar = click.progressbar(length=total, label=name, file=sys.stderr, show_pos=False)
            self._bar.__enter__()
        self._bar.update(done - self._done)
        self._done = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None

    def __enter__(self) -> _ByteProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    main()
