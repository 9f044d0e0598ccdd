"""The ``audit`` command line: parses options, calls the library, maps errors to exit codes.

Exit codes: 0 success; 1 an audit gate failed; 2 bad input (one-line reason on stderr).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from audit import __version__
from audit.config import CLUSTER_METHODS, DATASETS, DEFAULT_TOLERANCE, EVIDENCE, MASKS, PRECISIONS, TARGETS
from audit.errors import AuditError, first_line

if TYPE_CHECKING:
    from audit.report import ReportResult


INTERNAL_ERROR = 3
DEBUG_VARIABLE = "CAM_AUDIT_DEBUG"


class AuditGroup(click.Group):
    """No traceback reaches a user: bad input (:class:`AuditError`, a usage error) is one line and
    exit 2; anything unforeseen is one line naming the error and exit 3, with the traceback only
    when ``CAM_AUDIT_DEBUG=1``."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AuditError as exc:
            _fail(str(exc), exc.exit_code)
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx is not None else "audit"
            _fail(f"{exc.format_message()} (see {command} --help)", exc.exit_code)
        except (click.exceptions.Exit, click.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - the last line of defence: a bug, said in one line
            if os.environ.get(DEBUG_VARIABLE):
                raise
            _fail(
                f"internal error: {type(exc).__name__}: {first_line(exc)} (a bug in cam-audit; rerun with "
                f"{DEBUG_VARIABLE}=1 for the traceback)",
                INTERNAL_ERROR,
            )


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {' '.join(message.split())}", err=True)
    sys.exit(code)


def _folder(path: Path | None, option: str) -> None:
    """A folder option that names an existing file is bad input, said before anything is written."""
    if path is not None and path.exists() and not path.is_dir():
        raise AuditError(f"{option} {path} is a file; give a folder")


def _classes_option(ctx, param, value: str | None):
    from audit.models.source import parse_classes

    return None if value is None else list(parse_classes(value))


def _numbers_option(count: int, kind: type, what: str):
    def parse(ctx, param, value: str | None):
        if value is None:
            return None
        parts = [p for p in value.replace("x", ",").split(",") if p.strip()]
        try:
            numbers = [kind(p) for p in parts]
        except ValueError:
            raise click.BadParameter(f"{value!r}: expected {what}") from None
        if count == 2 and len(numbers) == 1:
            numbers = numbers * 2  # one side: a square input
        if len(numbers) != count:
            raise click.BadParameter(f"{value!r}: expected {what}")
        return numbers

    return parse


def model_options(command):
    """--model SPEC (and its older name --checkpoint) with the options that complete a spec."""
    options = [
        click.option(
            "--model",
            help="a cam-audit checkpoint file, timm:NAME, torchvision:NAME or package.module:callable",
        ),
        click.option(
            "--checkpoint", type=click.Path(path_type=Path), help="a cam-audit checkpoint file (the same as --model)"
        ),
        click.option(
            "--weights",
            type=click.Path(path_type=Path),
            help="weights for a timm:, torchvision: or module spec (.safetensors, or a .pt/.pth state dict)",
        ),
        click.option(
            "--classes",
            callback=_classes_option,
            help="the model's classes in output order: a comma list or a file of one per line "
            "[default: the dataset's classes]",
        ),
        click.option(
            "--input-size",
            callback=_numbers_option(2, int, "a side (224) or height,width"),
            help="model input as H,W or one side [default: the model's own configuration, else 224]",
        ),
        click.option(
            "--mean",
            callback=_numbers_option(3, float, "3 comma-separated numbers"),
            help="input normalisation mean, R,G,B [default: the model's own, else ImageNet's]",
        ),
        click.option(
            "--std",
            callback=_numbers_option(3, float, "3 comma-separated numbers"),
            help="input normalisation std, R,G,B [default: the model's own, else ImageNet's]",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _model_request(model: str | None, checkpoint: Path | None, weights, classes, input_size, mean, std):
    """The ModelRequest of the model options; exactly one of --model and --checkpoint."""
    from audit.models.source import ModelRequest

    if model and checkpoint and model != str(checkpoint):
        raise AuditError("give --model or --checkpoint, not both")
    spec = model or (str(checkpoint) if checkpoint else None)
    if not spec:
        raise click.UsageError("missing option --model (or --checkpoint)")
    return ModelRequest(
        spec=spec,
        weights=str(weights) if weights else None,
        classes=tuple(classes) if classes else None,
        input_size=tuple(input_size) if input_size else None,
        mean=tuple(mean) if mean else None,
        std=tuple(std) if std else None,
    )


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


DATASET_CHOICE = click.Choice(DATASETS)
FAIL_ON = click.option(
    "--fail-on",
    type=click.Choice(["warn", "fail"]),
    default=None,
    help="exit 1 when a class's status reaches this level",
)
CLUSTER_METHOD = click.option(
    "--cluster-method",
    type=click.Choice(CLUSTER_METHODS),
    default=None,
    help="maps clustered into strategies per class [default: the run's, else consensus]",
)
GALLERY = click.option(
    "--gallery", default=8, show_default=True, type=click.IntRange(min=0), help="worst cases shown per flagged class"
)


def _report(
    run_dir: Path | str,
    overrides: dict,
    gallery: int,
    stream,
    baseline: str | None = None,
    tolerance=DEFAULT_TOLERANCE,
    cluster_method: str | None = None,
) -> ReportResult:
    from audit.report import build_report

    result = build_report(
        run_dir, overrides, gallery=gallery, baseline=baseline, tolerance=tolerance, cluster_method=cluster_method
    )
    for line in result.headline():
        click.echo(line, file=stream)
    return result


def _default(name: str) -> str:
    """An option's default as the help shows it: the RunConfig's, the one source of defaults."""
    from audit.config import RunConfig

    value = RunConfig.default(name)
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _typed(ctx: click.Context, not_config: tuple[str, ...]) -> dict:
    """The options typed on the command line (not their defaults), by RunConfig name."""
    from click.core import ParameterSource

    typed = {
        name: value
        for name, value in ctx.params.items()
        if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
        and not name.startswith("threshold_")
        and name not in not_config
    }
    for key in ("checkpoint", "weights", "data_dir", "out", "baseline"):
        if typed.get(key) is not None:
            typed[key] = str(typed[key])
    thresholds = _thresholds(ctx.params)
    return {**typed, "thresholds": thresholds} if thresholds else typed


TOLERANCE = click.option(
    "--tolerance",
    type=click.FloatRange(0, 1),
    default=None,
    help="with a baseline: a class regressed when a rate rose by more than this (0.05 = 5 points) "
    f"[default: {_default('tolerance')}]",
)


class Location(click.ParamType):
    """A local path (a Path), or a URI on object storage (``s3://bucket/ds/manifest.csv``, kept as
    the string it is: a Path would fold its ``//``)."""

    name = "path or URI"

    def convert(self, value, param, ctx):
        from audit.data.storage import is_uri

        if isinstance(value, Path) or not is_uri(str(value)):
            return Path(value)
        return str(value)


LOCATION = Location()


@main.command("run")
@click.option(
    "--config", "config_file", type=click.Path(path_type=Path, dir_okay=False), help="options from a TOML file"
)
@click.option("--dataset", type=DATASET_CHOICE)
@click.option(
    "--data-dir",
    type=LOCATION,
    help="dataset folder (for manifest: the CSV/Parquet file, also on object storage: s3://, gs://, hdfs://)",
)
@model_options
@click.option(
    "--out",
    type=LOCATION,
    help=f"runs go to OUT/NAME/<run_id>/, a folder or a URI (s3://, gs://, hdfs://) [default: {_default('out')}]",
)
@click.option(
    "--name", help="the audit's name: its history folder under OUT [default: the data folder's name, else the dataset]"
)
@click.option("--targets", type=click.Choice(TARGETS), help=f"classes to explain [default: {_default('targets')}]")
@click.option("--address", help="join a Ray cluster (auto, ray://host:10001); default: start a local one")
@click.option("--batch-size", type=click.IntRange(min=1), help="images per batch [default: 256 on a GPU, 32 on a CPU]")
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    help=f"fp32, or bf16 autocast; auto: bf16 on a GPU, fp32 on a CPU [default: {_default('precision')}]",
)
@click.option("--limit", type=click.IntRange(min=1), help="only the first N images, for a quick look")
@click.option(
    "--masks",
    type=click.Choice(MASKS),
    help=f"auto: a row's own mask, else an estimated lesion mask [default: {_default('masks')}]",
)
@click.option(
    "--evidence",
    type=click.Choice(EVIDENCE),
    help="interventions beside the maps: the object hidden / alone (occlusion), the image times each map "
    f"(faithfulness) [default: {_default('evidence')}]",
)
@click.option(
    "--sanity-images",
    type=click.IntRange(min=0),
    help=f"images the model-randomization sanity check explains (0: off) [default: {_default('sanity_images')}]",
)
@click.option("--target-layer", help="module to explain (default: found automatically)")
@click.option("--classifier", help="linear layer CAM reads (default: found automatically)")
@click.option(
    "--gradcampp-eps",
    type=click.FloatRange(min=0),
    help="added to Grad-CAM++'s alpha denominator (1e-6 matches pytorch-grad-cam) "
    f"[default: {_default('gradcampp_eps')}]",
)
@click.option("--grid", type=click.IntRange(min=2), help=f"side of the agreement grid [default: {_default('grid')}]")
@click.option(
    "--topk", type=click.FloatRange(0, 1, min_open=True), help=f"top-region share [default: {_default('topk')}]"
)
@click.option(
    "--delta", type=click.FloatRange(0, 1, min_open=True), help=f"IoU threshold of a map [default: {_default('delta')}]"
)
@click.option("--actors", type=click.IntRange(min=1), help="explain actors (default: one per GPU, else per node)")
@click.option(
    "--node-resource",
    metavar="NAME",
    help="run the job on the Ray nodes that hold this custom resource (ray start --resources='{\"NAME\": 1}')",
)
@click.option("--keep", type=click.IntRange(min=1), help="keep this audit's newest N runs (never the baseline)")
@click.option(
    "--baseline",
    type=LOCATION,
    help="compare with this run (a run folder or a baseline/latest pointer)",
)
@TOLERANCE
@click.option("--resume", "resume_dir", type=LOCATION, help="finish an interrupted run (a folder or a URI)")
@click.option("--report/--no-report", default=None, help="end with the report stage [default: report]")
@click.option("--batch-delay", default=0.0, type=float, hidden=True, help="tests: seconds of sleep per batch")
@FAIL_ON
@click.option(
    "--gallery",
    type=click.IntRange(min=0),
    help=f"worst cases shown per flagged class [default: {_default('gallery')}]",
)
@click.option(
    "--cluster-method",
    type=click.Choice(CLUSTER_METHODS),
    help=f"maps the report clusters into strategies per class [default: {_default('cluster_method')}]",
)
@threshold_options
@click.pass_context
def run_command(ctx: click.Context, config_file: Path | None, resume_dir: Path | None, batch_delay: float, **_) -> None:
    """Explain every image of a dataset with CAM, Grad-CAM and Grad-CAM++ on a Ray cluster.

    Writes OUT/NAME/<run_id>/ with run.json, manifest.parquet and explanations/ (one row per
    image and target, ok or error with a reason), then the report stage's summary.json and
    report.html, and prints the run directory as the last line. With --baseline it also
    compares the run with that one (compare.json and a report section). A complete run becomes
    OUT/NAME/latest; --keep N then deletes the oldest runs. Exits 1 when --fail-on is reached by
    the report or the comparison. Options may come from a TOML file (--config); flags typed
    here override it. Ctrl-C stops cleanly; `audit run --resume RUN_DIR` then finishes
    without recomputing.
    """
    from audit.config import build_config
    from audit.history import history_of, location, prune, resolve_run
    from audit.pipeline.run import Execution, resume_audit, run_audit

    typed = _typed(ctx, not_config=("config_file", "resume_dir", "batch_delay"))
    execution = Execution(batch_delay=batch_delay)
    try:
        if resume_dir is not None:
            if config_file is not None:
                raise AuditError("--resume takes the run's own configuration; leave out --config")
            if "baseline" in typed:
                typed["baseline"] = _baseline(typed["baseline"])
            # a URI is taken over on the store before it is fetched (resume_audit)
            run_dir = resume_audit(
                resume_dir if isinstance(resume_dir, str) else resolve_run(resume_dir), execution, typed
            )
            config = _run_config(run_dir)
        else:
            config = build_config(config_file, typed)
            # resolved now, before anything is computed and before this run moves `latest`
            config = config.updated(baseline=_baseline(config.baseline))
            run_dir = run_audit(config, execution)
    except KeyboardInterrupt:
        click.echo("interrupted: finish the run with `audit run --resume RUN_DIR`", err=True)
        sys.exit(130)
    result = None
    if config.report:
        result = _report(run_dir, {}, config.gallery, sys.stderr, config.baseline, config.tolerance)
        click.echo(f"report: {result.html_location}", err=True)
    if config.keep:
        for gone in prune(history_of(run_dir), config.keep, protect=(run_dir, config.baseline)):
            click.echo(f"deleted old run: {gone}", err=True)
    click.echo(location(run_dir))
    if config.fail_on and result is not None and result.reaches(config.fail_on):
        sys.exit(1)


def _baseline(path: str | None) -> str | None:
    """The run folder to compare with; a ``baseline``/``latest`` pointer not yet set means none (first run)."""
    from audit.data.storage import is_uri
    from audit.history import POINTERS, location, pointer_exists, resolve_run

    if not path:
        return None
    pointer = str(path) if is_uri(path) else Path(path)
    if str(pointer).rstrip("/").rsplit("/", 1)[-1] in POINTERS and not pointer_exists(pointer):
        click.echo(f"note: nothing at {pointer} yet, so this run is not compared with a baseline", err=True)
        return None
    return location(resolve_run(pointer))


def _run_config(run_dir: Path):
    from audit.pipeline.run import read_config, read_info

    return read_config(run_dir, read_info(run_dir))


@main.command("report")
@click.argument("run_dir", type=LOCATION)
@FAIL_ON
@GALLERY
@CLUSTER_METHOD
@click.option("--json", "as_json", is_flag=True, help="print summary.json instead of the verdict lines")
@threshold_options
def report_command(
    run_dir: Path | str, fail_on: str | None, gallery: int, cluster_method: str | None, as_json: bool, **options
) -> None:
    """Aggregate a run per class, flag it, and write summary.json and report.html into RUN_DIR.

    Reads only the columns it needs and recomputes no map, so thresholds can change freely.
    Thresholds not given here are the run's own (its config), else the defaults. Exits 0 when
    no class reaches --fail-on, 1 when one does, 2 when RUN_DIR is not a readable run.
    """
    stream = sys.stderr if as_json else sys.stdout
    result = _report(run_dir, _thresholds(options), gallery, stream, cluster_method=cluster_method)
    click.echo(json.dumps(result.summary, indent=2) if as_json else f"report: {result.html_location}")
    if fail_on and result.reaches(fail_on):
        sys.exit(1)


@main.command("explain")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@model_options
@click.option(
    "--target",
    default="pred",
    show_default=True,
    help="class to explain: pred, label (the class the image's folder names), or a class name or index",
)
@click.option(
    "--methods",
    help="comma list of cam, gradcam, gradcampp, guided-gradcam, guided-gradcampp [default: all the model has]",
)
@click.option("--npy", is_flag=True, help="also write each map as OUT/<stem>.<method>.npy at the input resolution")
@click.option("--target-layer", help="module to explain (default: found automatically)")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True, help="folder for the pictures")
def explain_command(
    images: tuple[Path, ...],
    model: str | None,
    checkpoint: Path | None,
    weights: Path | None,
    classes: list[str] | None,
    input_size: list[int] | None,
    mean: list[float] | None,
    std: list[float] | None,
    target: str,
    methods: str | None,
    npy: bool,
    target_layer: str | None,
    device: str | None,
    out: Path,
) -> None:
    """Explain a few images: OUT/<stem>.png shows each image and one overlay per method.

    The same engine and preprocessing as `audit run`, for a one-off look. Prints the files written.
    """
    from audit.explain.look import explain_images, parse_methods, write_looks

    _require_cuda(device)
    _folder(out, "--out")
    request = _model_request(model, checkpoint, weights, classes, input_size, mean, std)
    looks = explain_images(request, list(images), target, parse_methods(methods), target_layer, device)
    for look in looks:
        click.echo(
            f"{look.path}: {look.target_name}, p = {look.probability:.3f} (predicted {look.predicted})", err=True
        )
    for path in write_looks(looks, out, npy):
        click.echo(path)


@main.group()
def model() -> None:
    """See where an audit will explain a model, before running one."""


@model.command("inspect")
@click.argument("spec")
@click.option("--weights", type=click.Path(path_type=Path), help="weights (default: random, enough to see the layers)")
@click.option(
    "--classes", callback=_classes_option, help="classes in output order: a comma list or a file of one per line"
)
@click.option("--input-size", callback=_numbers_option(2, int, "a side (224) or height,width"), help="H,W or one side")
@click.option("--mean", callback=_numbers_option(3, float, "3 comma-separated numbers"), help="R,G,B")
@click.option("--std", callback=_numbers_option(3, float, "3 comma-separated numbers"), help="R,G,B")
@click.option("--target-layer", help="check this module instead of the automatic choice")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def model_inspect_command(spec, weights, classes, input_size, mean, std, target_layer, as_json) -> None:
    """What an audit of SPEC will do: size, input, target layer, layout and grid, CAM, other layers.

    SPEC is a cam-audit checkpoint file, timm:NAME, torchvision:NAME or package.module:callable.
    Exits 2, with the candidate layers, where no layer can be explained.
    """
    from audit.models.describe import describe_model, format_description

    request = _model_request(spec, None, weights, classes, input_size, mean, std)
    found = describe_model(request, target_layer)
    click.echo(json.dumps(found) if as_json else format_description(found))


@main.command("compare")
@click.argument("baseline_run", type=LOCATION)
@click.argument("run_dir", metavar="RUN", type=LOCATION)
@FAIL_ON
@TOLERANCE
@GALLERY
@CLUSTER_METHOD
@click.option("--json", "as_json", is_flag=True, help="print compare.json instead of the verdict lines")
@threshold_options
def compare_command(
    baseline_run: Path | str,
    run_dir: Path | str,
    fail_on: str | None,
    tolerance: float | None,
    gallery: int,
    cluster_method: str | None,
    as_json: bool,
    **options,
) -> None:
    """Compare RUN with BASELINE_RUN class by class: rate deltas, regressions, new and resolved flags.

    Both runs are judged with RUN's thresholds (its config, then the ones given here). A class
    regressed when a rate rose by more than --tolerance. Writes compare.json into RUN, and
    RUN's summary.json and report.html again (with a comparison section). Either argument may
    be a run folder or a `latest`/`baseline` pointer. Exits 0 when the comparison does not
    reach --fail-on (regressed: fail; new flags only: warn), 1 when it does, 2 on bad input.
    """
    from audit.report import build_report

    stream = sys.stderr if as_json else sys.stdout
    result = build_report(
        run_dir,
        _thresholds(options),
        gallery=gallery,
        baseline=baseline_run,
        tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance,
        cluster_method=cluster_method,
    )
    for line in result.comparison.headline():
        click.echo(line, file=stream)
    comparison = result.comparison.to_dict()
    click.echo(json.dumps(comparison, indent=2) if as_json else f"report: {result.html_location}")
    if fail_on and result.comparison.reaches(fail_on):
        sys.exit(1)


@main.command("baseline")
@click.argument("run_dir", type=LOCATION)
def baseline_command(run_dir: Path | str) -> None:
    """Pin RUN_DIR as its audit's baseline: OUT/NAME/baseline then names it.

    Retention (--keep) never deletes the pinned run, and `audit run --baseline OUT/NAME/baseline`
    (or `baseline = ...` in a config file) compares every new run with it. Prints the pointer.
    """
    from audit.history import pin_baseline

    click.echo(pin_baseline(run_dir))


@main.group()
def bench() -> None:
    """Measure speed: the explanation engine against a plain forward and the peer libraries."""


@bench.command("engine")
@click.option(
    "--model",
    "--arch",
    "arch",
    default="resnet50",
    show_default=True,
    help="model spec with random weights: a torchvision name, timm:NAME, torchvision:NAME or package.module:callable",
)
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
@click.option(
    "--model",
    "--arch",
    "arch",
    default="resnet18",
    show_default=True,
    help="model spec with random weights: a torchvision name, timm:NAME or torchvision:NAME",
)
@click.option(
    "--images",
    default=256,
    show_default=True,
    type=click.IntRange(min=8),
    help="the small dataset; the large one is 4x",
)
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(min=32), help="the model's input")
@click.option(
    "--photo-size",
    default="600x450",
    show_default=True,
    help="the synthetic photographs, WIDTHxHEIGHT (HAM10000's size by default)",
)
@click.option("--batch-size", type=click.IntRange(min=1), help="[default: 256 on a GPU, 32 on a CPU]")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def bench_pipeline_command(
    arch: str, images: int, image_size: int, photo_size: str, batch_size: int | None, as_json: bool
) -> None:
    """The whole job vs a forward-only job: end-to-end and steady-state images/s, time to the first
    batch, decoding per image, GPU utilisation, and peak memory at two dataset sizes."""
    from audit.pipeline.bench import bench_pipeline, format_pipeline_bench

    width, _, height = photo_size.lower().partition("x")
    if not (width.isdigit() and height.isdigit() and int(width) >= 32 and int(height) >= 32):
        raise click.BadParameter(
            f"expected WIDTHxHEIGHT of at least 32x32, got {photo_size!r}", param_hint="--photo-size"
        )
    result = bench_pipeline(
        arch=arch, images=images, image_size=image_size, batch_size=batch_size, photo_size=(int(height), int(width))
    )
    click.echo(json.dumps(result.to_dict()) if as_json else format_pipeline_bench(result))


@bench.command("report")
@click.option("--rows", default=10_000, show_default=True, type=click.IntRange(min=20), help="images in the run")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def bench_report_command(rows: int, as_json: bool) -> None:
    """Time the report stage (aggregation, strategy clusters, report.html) on a synthetic run."""
    from audit.report.bench import bench_report, format_report_bench

    result = bench_report(rows=rows)
    click.echo(json.dumps(result.to_dict()) if as_json else format_report_bench(result))


@main.group()
def data() -> None:
    """Inspect datasets and generate the synthetic one."""


@data.command("check")
@click.option("--dataset", "name", type=DATASET_CHOICE, required=True)
@click.option(
    "--data-dir",
    type=LOCATION,
    help="dataset folder (for manifest: the CSV/Parquet file, also on object storage: s3://, gs://, hdfs://)",
)
@click.option("--mask-dir", type=LOCATION, help="imagefolder only: parallel tree of masks")
@click.option("--deep", is_flag=True, help="decode every image fully (finds truncated files; slower)")
@click.option(
    "--estimate-masks",
    default=0,
    type=click.IntRange(min=0),
    help="score estimated masks against provided ones on N images",
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def data_check(
    name: str, data_dir: Path | str | None, mask_dir: Path | None, deep: bool, estimate_masks: int, as_json: bool
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

    _folder(out, "--out")
    try:
        planted = dict(parse_shortcut(text) for text in shortcuts)
        spec = SyntheticSpec(images=images, height=height, width=width, shortcuts=planted, seed=seed)
    except ValueError as exc:
        raise AuditError(str(exc)) from exc
    click.echo(generate(out, spec))


@main.command("train")
@click.option("--dataset", "name", type=DATASET_CHOICE, required=True)
@click.option("--data-dir", type=click.Path(path_type=Path), help="dataset folder (for manifest: the CSV/Parquet file)")
@click.option("--arch", required=True, help="a torchvision name (resnet50, torchvision:resnet50) or timm:NAME")
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(min=32), help="square input side")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True), help="peak rate")
@click.option(
    "--weights",
    default="imagenet",
    show_default=True,
    help="imagenet (torchvision's local cache), none (random init), or a weights file (.safetensors, .pt)",
)
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0), help="data loader processes")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True, help="checkpoint to write")
def train_command(
    name, data_dir, arch, image_size, epochs, batch_size, lr, weights, workers, seed, device, out
) -> None:
    """Fine-tune a torchvision or timm classifier; writes OUT (a cam-audit checkpoint) and OUT's .eval.json.

    Splits by lesion group (no lesion on both sides), stratified by class; class-weighted loss;
    keeps the epoch with the best validation macro-F1 and evaluates it on the test split.
    """
    from audit.models.checkpoint import build_model, parse_arch
    from audit.models.train import TrainConfig, train_model

    if parse_arch(arch)[0] == "module":
        raise AuditError(f"--arch {arch}: audit train builds torchvision or timm architectures")
    build_model(arch, 2, (image_size, image_size))  # an unknown name fails here, before any data is read
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

    _folder(out, "--out")
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
    _folder(dest, "--dest")
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
