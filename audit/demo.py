"""`audit demo`: the whole product on a dataset with a planted shortcut, in a few minutes on a CPU.

1. Generate a synthetic HAM10000-layout dataset in which one class (df) carries a colour patch
   in a corner that is its only signal, while the other classes differ by their lesions;
2. train a small classifier on it from random weights (`audit train`);
3. audit it (`audit run` on a local Ray instance, then the report stage);
4. say whether the report caught the shortcut: the planted class flagged off-object by a
   method that passes the sanity check, and confirmed by intervention (with its lesion hidden it
   is still recognised), no clean class flagged; and which methods passed the sanity check.

Everything lives under ``--out``; a second run reuses the data and the model when their
settings are unchanged, and only audits again.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from audit.config import RunConfig
from audit.data.synthetic import Shortcut, SyntheticSpec, generate, load_spec
from audit.models.train import TrainConfig, train_model
from audit.pipeline.run import Execution, run_audit
from audit.report import ReportResult, build_report
from audit.report.build import sanity_line
from audit.report.figures import method_title

LOCALIZED_ORDER = ("consensus", "cam", "gradcam", "gradcampp")


@dataclass(frozen=True)
class DemoSettings:
    images: int = 700
    height: int = 96
    width: int = 128
    shortcut_class: str = "df"
    shortcut: Shortcut = field(default_factory=lambda: Shortcut("patch", correlation=1.0, only_signal=True))
    arch: str = "resnet18"
    image_size: int = 128
    epochs: int = 6
    batch_size: int = 32
    seed: int = 0

    @property
    def spec(self) -> SyntheticSpec:
        return SyntheticSpec(
            images=self.images,
            height=self.height,
            width=self.width,
            shortcuts={self.shortcut_class: self.shortcut},
            seed=self.seed,
        )

    def train_config(self, data_dir: Path, out: Path) -> TrainConfig:
        return TrainConfig(
            dataset="synthetic",
            data_dir=str(data_dir),
            arch=self.arch,
            out=str(out),
            image_size=self.image_size,
            epochs=self.epochs,
            batch_size=self.batch_size,
            weights="none",
            seed=self.seed,
        )


@dataclass
class DemoResult:
    run_dir: Path
    report: ReportResult
    shortcut_class: str
    caught: bool
    false_flags: list[str]
    accuracy: float | None

    def lines(self) -> list[str]:
        """What the demo found, in plain words."""
        name = self.shortcut_class
        entry = self.entry
        method = self.witness
        rate = entry["off_object"][method]["value"]
        planted = f"Planted: class {name}'s only signal is a colour patch in an image corner, away from the lesion."
        if self.caught:
            found = (
                f"Found: {name} is flagged off-object ({100 * rate:.0f}% of its {method_title(method)} explanations "
                "lie mostly off the lesion)"
            )
        else:
            found = f"Missed: {name} was not flagged off-object ({_pct(rate)} of its explanations lie off the lesion)"
        verdict = entry.get("intervention")
        if verdict:
            found += f"; {verdict['note']}"
        found += (
            "; no other class is flagged."
            if not self.false_flags
            else f"; also flagged: {', '.join(self.false_flags)}."
        )
        lines = [planted, found]
        if self.report.sanity is not None:
            lines.append(f"Sanity check: {sanity_line(self.report.sanity)}.")
        return [*lines, f"Report: {self.report.html_path}"]

    @property
    def witness(self) -> str:
        """The method the found line quotes: the first of the consensus, CAM, Grad-CAM and Grad-CAM++
        whose off-object flag on the planted class stands (the consensus when none does)."""
        standing = {f["method"] for f in self.entry["flags"] if f["kind"] == "off_object" and f["stands"]}
        return next((m for m in LOCALIZED_ORDER if m in standing), "consensus")

    @property
    def entry(self) -> dict:
        """The planted class's summary entry (its first target kind)."""
        return next(c for c in self.report.summary["classes"] if c["label_name"] == self.shortcut_class)

    @property
    def confirmed(self) -> bool:
        """The off-object finding is backed by the model's answers with the lesion hidden."""
        return (self.entry.get("intervention") or {}).get("verdict") == "confirmed"

    @property
    def ok(self) -> bool:
        return self.caught and self.confirmed and not self.false_flags


def run_demo(out: Path, settings: DemoSettings | None = None, say: Callable[[str], None] | None = None) -> DemoResult:
    settings = settings or DemoSettings()
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    out = Path(out).resolve()
    data_dir = out / "data"
    wanted = json.loads(json.dumps(settings.spec.to_json()))  # as it reads back from synthetic.json
    if (load_spec(data_dir) or {}).get("spec") != wanted:
        say(f"demo: generating {settings.images} synthetic images in {data_dir}")
        generate(data_dir, settings.spec)
    else:
        say(f"demo: reusing the synthetic images in {data_dir}")
    model = out / "model.pt"
    stamp = out / "model.json"
    fingerprint = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True, default=str).encode()).hexdigest()
    if not (model.is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("settings") == fingerprint):
        say(f"demo: training {settings.arch} from random weights ({settings.epochs} epochs)")
        train_model(settings.train_config(data_dir, model), say)
        stamp.write_text(json.dumps({"settings": fingerprint}), encoding="utf-8")
    else:
        say(f"demo: reusing the model {model}")
    evaluation = json.loads(model.with_suffix(".eval.json").read_text())
    say("demo: auditing it (audit run on a local Ray instance)")
    run_dir = run_audit(
        RunConfig(dataset="synthetic", data_dir=str(data_dir), model=str(model), out=str(out), name="runs"),
        Execution(progress=True),
    )
    report = build_report(run_dir)
    flagged = {c["label_name"]: {f["kind"] for f in c["flags"] if f["stands"]} for c in report.summary["classes"]}
    caught = "off_object" in flagged.get(settings.shortcut_class, set())
    false_flags = sorted(name for name, kinds in flagged.items() if kinds and name != settings.shortcut_class)
    return DemoResult(run_dir, report, settings.shortcut_class, caught, false_flags, evaluation["test"]["accuracy"])


def _pct(value: float | None) -> str:
    return "?" if value is None else f"{100 * value:.0f}%"
