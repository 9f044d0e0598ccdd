"""One validated configuration for `audit run`: command-line flags and TOML files build the same object.

``run.json`` records it and ``--resume`` reads it back. A TOML file holds any option of the
command under its name with underscores (``batch_size = 64``) and the report thresholds in a
``[thresholds]`` table; relative paths in it resolve against the file's folder. Flags given on
the command line override the file. Unknown keys and values of the wrong type are errors that
name the key (see ``jobs/ham10000.toml``).
"""

from __future__ import annotations

import difflib
import functools
import math
import re
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

from audit.errors import AuditError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DATASETS = ("ham10000", "imagefolder", "manifest", "synthetic")
TARGETS = ("pred", "label", "both")
MASKS = ("auto", "provided", "estimate", "none")
EVIDENCE = ("none", "occlusion", "faithfulness", "all")
PRECISIONS = ("auto", "fp32", "bf16")
CLUSTER_METHODS = ("consensus", "cam", "gradcam", "gradcampp")
DEFAULT_TOLERANCE = 0.05  # `audit compare`: a rate that rose by more than this is a regression
REQUIRED = ("dataset", "model")
PATH_KEYS = ("model", "weights", "data_dir", "out", "baseline")  # `model` only where it names a file
ALIASES = {"checkpoint": "model"}  # the older name of the model option
# The options that decide which rows a run computes and what is in them: the run id's hash covers
# these (with the model's and the dataset's fingerprints), and --resume cannot change them.
COMPUTED = (
    "dataset",
    "data_dir",
    "model",
    "weights",
    "classes",
    "input_size",
    "mean",
    "std",
    "targets",
    "limit",
    "masks",
    "evidence",
    "sanity_images",
    "target_layer",
    "classifier",
    "gradcampp_eps",
    "precision",
    "grid",
    "topk",
    "delta",
)


class ConfigError(AuditError):
    """An option with a value that cannot work."""


@dataclass(frozen=True)
class RunConfig:
    """Every option of `audit run`.

    The model (:mod:`audit.models.source`): ``model`` is a spec (a cam-audit checkpoint file,
    ``timm:NAME``, ``torchvision:NAME`` or ``package.module:callable``; ``checkpoint`` is its
    older name); ``weights``, ``classes``, ``input_size`` ([h, w]), ``mean`` and ``std`` complete
    a spec that is not a checkpoint file.

    What to compute (:data:`COMPUTED`): ``masks``: ``auto`` uses a row's mask where it has one
    and estimates the lesion elsewhere; ``provided`` uses masks only; ``estimate`` always
    estimates; ``none`` scores no localization. ``evidence``: the interventions computed
    beside the maps (:mod:`audit.explain.evidence`): occlusion counterfactuals, the
    faithfulness measures, ``all`` or ``none``. ``sanity_images``: images the model-randomization
    sanity check explains (:mod:`audit.explain.sanity`; 0 turns it off). ``precision``: the
    explain actors' arithmetic, ``fp32`` or ``bf16`` (autocast); ``auto`` is bf16 on a GPU and
    fp32 on a CPU, settled when the run starts (run.json ``execution``) and kept by ``--resume``.
    ``grid``, ``topk`` and ``delta`` tune the metrics (:mod:`audit.explain.metrics`).

    How to run it and what to do with it: ``name`` is the audit's name: runs go to
    ``out/name/<run_id>/`` (default: the name of ``data_dir``, else the dataset kind).
    ``actors``: explain actors (default: one per GPU, else one per node). ``node_resource``: a
    custom Ray resource (``ray start --resources='{"audit": 1}'``) that places the job's read
    tasks and explain actors on the nodes holding it. ``batch_size``: images
    per batch (default: 256 on a GPU, 32 on a CPU; run.json ``execution`` records it). ``keep``: how many
    runs of this audit to keep (the baseline and the ``latest`` run are never deleted).
    ``baseline``: a run to compare with at the end. ``cluster_method``: the maps the report
    clusters into strategies per class (:mod:`audit.report.clusters`). ``fail_on``: exit 1 when the report, or the
    comparison, reaches this status. ``thresholds``: the report's flag thresholds that differ
    from the defaults (:class:`audit.report.Thresholds`). None of these changes a computed row.
    """

    dataset: Literal["ham10000", "imagefolder", "manifest", "synthetic"]
    model: str
    weights: str | None = None
    classes: list | None = None
    input_size: list | None = None
    mean: list | None = None
    std: list | None = None
    data_dir: str | None = None
    out: str = "reports"
    name: str | None = None
    targets: Literal["pred", "label", "both"] = "pred"
    address: str | None = None
    batch_size: int | None = None
    limit: int | None = None
    masks: Literal["auto", "provided", "estimate", "none"] = "auto"
    evidence: Literal["none", "occlusion", "faithfulness", "all"] = "all"
    sanity_images: int = 64
    target_layer: str | None = None
    classifier: str | None = None
    gradcampp_eps: float = 0.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    grid: int = 56
    topk: float = 0.2
    delta: float = 0.5
    actors: int | None = None
    node_resource: str | None = None
    keep: int | None = None
    report: bool = True
    gallery: int = 8
    cluster_method: Literal["consensus", "cam", "gradcam", "gradcampp"] = "consensus"
    fail_on: Literal["warn", "fail"] | None = None
    baseline: str | None = None
    tolerance: float = DEFAULT_TOLERANCE
    thresholds: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from audit.explain.metrics import MetricSettings
        from audit.report.thresholds import Thresholds

        hints = _hints()
        for spec in fields(self):
            _check_type(spec.name, getattr(self, spec.name), hints[spec.name])
        Thresholds.from_dict(self.thresholds)  # the report stage's; an error names the key
        for name in ("batch_size", "limit", "actors", "keep"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        try:
            MetricSettings(self.grid, self.topk, self.delta)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not 0 <= self.tolerance <= 1:
            raise ConfigError(f"tolerance must be in [0, 1], got {self.tolerance}")
        if self.gradcampp_eps < 0:
            raise ConfigError(f"gradcampp_eps must be >= 0, got {self.gradcampp_eps}")
        if self.sanity_images < 0:
            raise ConfigError(f"sanity_images must be >= 0 (0 turns the sanity check off), got {self.sanity_images}")
        _check_model_options(self)
        if self.gallery < 0:
            raise ConfigError(f"gallery must be >= 0, got {self.gallery}")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ConfigError(f"name must be a folder name of letters, digits, '.', '_' and '-', got {self.name!r}")
        from audit.data.storage import is_uri

        for name in ("out", "baseline"):
            value = getattr(self, name)
            if value and is_uri(value) and "?" in value:
                raise ConfigError(
                    f"{name} must be a URI without options (?...): give a store's endpoint and options by its "
                    f"environment (AWS_ENDPOINT_URL...), got {value!r}"
                )
        if not self.report and (self.fail_on or self.baseline):
            raise ConfigError("fail_on and baseline need the report stage: leave report on (or drop them)")

    @property
    def target_kinds(self) -> tuple[str, ...]:
        return ("pred", "label") if self.targets == "both" else (self.targets,)

    @property
    def audit_name(self) -> str:
        """``name``, else the dataset's folder (or file) name, else the dataset kind."""
        return self.name or (Path(self.data_dir).stem if self.data_dir else self.dataset)

    def model_request(self):
        """The model these options name (:class:`audit.models.source.ModelRequest`)."""
        from audit.models.source import ModelRequest

        return ModelRequest(
            spec=self.model,
            weights=self.weights,
            classes=tuple(self.classes) if self.classes else None,
            input_size=tuple(self.input_size) if self.input_size else None,
            mean=tuple(float(v) for v in self.mean) if self.mean else None,
            std=tuple(float(v) for v in self.std) if self.std else None,
        )

    @property
    def computed(self) -> dict:
        """The options that decide the computed rows."""
        return {name: getattr(self, name) for name in COMPUTED}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        """Validated: an unknown key is an error that names it (and the closest known key)."""
        data = with_aliases(data)
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown option {_with_hint(unknown[0], known)}")
        absent = [name for name in REQUIRED if data.get(name) is None]
        if absent:
            raise ConfigError(f"missing option: {', '.join(absent)}")
        return cls(**data)

    @classmethod
    def default(cls, name: str):
        """The default of one option (for the command line's help)."""
        spec = next(f for f in fields(cls) if f.name == name)
        return spec.default_factory() if spec.default_factory is not MISSING else spec.default

    def updated(self, **changes) -> RunConfig:
        return RunConfig.from_dict({**self.to_dict(), **with_aliases(changes)})

    def resolved(self) -> RunConfig:
        """Paths made absolute, so a run can be resumed from another working directory."""
        return self.updated(**{key: _absolute(getattr(self, key)) for key in _path_keys(self.model)})


def read_config_file(path: Path) -> dict:
    """The options of a TOML file, checked key by key; relative paths resolved against its folder.

    Returns a partial option dict: the command line's flags and the defaults fill in the rest."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    data = with_aliases(data, str(path))
    known = [f.name for f in fields(RunConfig)]
    hints = _hints()
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown option {_with_hint(key, known)}")
        try:
            _check_type(key, value, hints[key])
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    from audit.data.storage import is_uri  # the data package loads pandas: not for every command

    for key in _path_keys(data.get("model")):
        if isinstance(data.get(key), str) and not is_uri(data[key]):
            data[key] = str((path.parent / Path(data[key]).expanduser()).resolve())
    return data


def build_config(file: Path | None, flags: dict) -> RunConfig:
    """The file's options (if any) with the command line's ``flags`` on top; thresholds merge key by key."""
    data = read_config_file(file) if file is not None else {}
    source = f"{file}: " if file is not None else ""
    thresholds = {**data.get("thresholds", {}), **flags.get("thresholds", {})}
    merged = {**data, **with_aliases(flags), "thresholds": thresholds}
    absent = [key for key in REQUIRED if merged.get(key) is None]
    if absent:
        options = " and ".join(f"--{key.replace('_', '-')}" for key in absent)
        raise ConfigError(f"audit run needs {options} (or those keys in a --config file, or --resume RUN_DIR)")
    try:
        return RunConfig.from_dict(merged)
    except AuditError as exc:
        raise ConfigError(f"{source}{exc}") from None


def with_aliases(data: dict, source: str = "") -> dict:
    """``data`` with older option names (``checkpoint``) under their current ones (``model``)."""
    out = dict(data)
    for old, new in ALIASES.items():
        if old in out:
            value = out.pop(old)
            if out.get(new) is not None and value is not None and out[new] != value:
                raise ConfigError(f"{source + ': ' if source else ''}give {old} or {new}, not both")
            out[new] = out.get(new) if value is None else value
    return out


def _path_keys(model: object) -> tuple[str, ...]:
    """The options that hold paths; ``model`` is one only when it names a checkpoint file."""
    from audit.models.source import spec_kind

    if isinstance(model, str) and spec_kind(model) == "checkpoint":
        return PATH_KEYS
    return tuple(key for key in PATH_KEYS if key != "model")


def _check_model_options(config: RunConfig) -> None:
    """classes, input_size, mean and std hold what they name."""
    classes = config.classes
    if classes is not None and not (classes and all(isinstance(c, str) and c.strip() for c in classes)):
        raise ConfigError(f"classes must be a non-empty list of class names, got {classes!r}")
    if classes is not None and len(set(classes)) != len(classes):
        raise ConfigError("classes has duplicate names")
    size = config.input_size
    if size is not None and not (len(size) == 2 and all(_is_instance(v, int) and v > 0 for v in size)):
        raise ConfigError(f"input_size must be [height, width] in pixels, got {size!r}")
    for key in ("mean", "std"):
        value = getattr(config, key)
        if value is not None and not (len(value) == 3 and all(_is_instance(v, float) for v in value)):
            raise ConfigError(f"{key} must be 3 numbers (one per RGB channel), got {value!r}")
    if config.std is not None and any(v <= 0 for v in config.std):
        raise ConfigError(f"std must be positive, got {config.std!r}")


@functools.cache
def _hints() -> dict:
    return get_type_hints(RunConfig)


def _check_type(key: str, value, hint) -> None:
    """Exact types, as TOML gives them: "32" is not a number and 1 is not a boolean."""
    if value is None and type(None) in get_args(hint):
        return
    options = [a for a in get_args(hint) if a is not type(None)] if get_origin(hint) is not Literal else []
    options = options or [hint]
    for option in options:
        if get_origin(option) is Literal:
            if value in get_args(option):
                return
            choices = ", ".join(repr(c) for c in get_args(option))
            raise ConfigError(f"{key} must be one of {choices}, got {value!r}")
        if _is_instance(value, option):
            return
    got = "" if isinstance(value, float) and not math.isfinite(value) else f" ({_describe(type(value))})"
    raise ConfigError(f"{key} must be {_describe(options[0])}, got {value!r}{got}")


def _is_instance(value, wanted) -> bool:
    if wanted is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if wanted is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, wanted)


def _describe(kind) -> str:
    return {
        int: "an integer",
        float: "a finite number",
        str: "a string",
        bool: "true or false",
        dict: "a table",
        list: "a list",
    }.get(kind, getattr(kind, "__name__", str(kind)))


def _with_hint(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})")


def _absolute(value: str | None) -> str | None:
    from audit.data.storage import is_uri

    return str(Path(value).expanduser().resolve()) if value and not is_uri(value) else value
