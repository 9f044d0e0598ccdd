"""One validated configuration for `audit run`: the CLI builds it, `run.json` records it, resume reads it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

from audit.errors import AuditError

TARGETS = ("pred", "label", "both")
MASKS = ("auto", "provided", "estimate", "none")


class ConfigError(AuditError):
    """An option with a value that cannot work."""


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides what `audit run` computes.

    ``masks``: ``auto`` uses a row's mask where it has one and estimates the lesion elsewhere;
    ``provided`` uses masks only; ``estimate`` always estimates; ``none`` scores no localization.
    ``actors``: explain actors (default: one per GPU, else one per node).
    ``thresholds``: the report stage's flag thresholds that differ from the defaults
    (:class:`audit.report.Thresholds`); they change no computed row.
    """

    dataset: str
    checkpoint: str
    data_dir: str | None = None
    out: str = "reports"
    targets: Literal["pred", "label", "both"] = "pred"
    address: str | None = None
    batch_size: int = 32
    limit: int | None = None
    masks: Literal["auto", "provided", "estimate", "none"] = "auto"
    target_layer: str | None = None
    classifier: str | None = None
    gradcampp_eps: float = 0.0
    grid: int = 56
    topk: float = 0.2
    delta: float = 0.5
    actors: int | None = None
    thresholds: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from audit.report.thresholds import Thresholds

        Thresholds.from_dict(self.thresholds)  # the report stage's; an error names the key
        if self.targets not in TARGETS:
            raise ConfigError(f"targets must be one of {', '.join(TARGETS)}, got {self.targets!r}")
        if self.masks not in MASKS:
            raise ConfigError(f"masks must be one of {', '.join(MASKS)}, got {self.masks!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if self.actors is not None and self.actors < 1:
            raise ConfigError(f"actors must be >= 1, got {self.actors}")
        if self.gradcampp_eps < 0:
            raise ConfigError("gradcampp_eps must be >= 0")

    @property
    def target_kinds(self) -> tuple[str, ...]:
        return ("pred", "label") if self.targets == "both" else (self.targets,)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown configuration keys: {', '.join(unknown)}")
        return cls(**data)

    def resolved(self) -> RunConfig:
        """Paths made absolute, so a run can be resumed from another working directory."""

        def absolute(value: str | None) -> str | None:
            return str(Path(value).expanduser().resolve()) if value else value

        data = self.to_dict()
        data.update(checkpoint=absolute(self.checkpoint), data_dir=absolute(self.data_dir), out=absolute(self.out))
        return RunConfig(**data)
