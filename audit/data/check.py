"""``audit data check``: is this dataset fit for a long audit job? Counted, not guessed.

Every image is opened (header and size, or a full decode with ``deep``) and every mask
likewise; the report counts per class images, lesions (groups), missing and unreadable files,
masks, rejected rows (unknown labels, duplicate ids, paths outside the root) and, on request,
how well estimated masks match the provided ones. A dataset is unusable when no image at all
can be read.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from audit.data.decode import DecodeError, decode_image, decode_mask, image_size
from audit.data.manifest import Dataset
from audit.data.masks import estimate_lesion_mask, mask_iou

SHOWN = 20  # problems listed by name; all are counted


@dataclass
class ClassCount:
    label: int
    label_name: str
    full_name: str
    images: int
    lesions: int
    readable: int
    masks: int


@dataclass
class CheckReport:
    dataset: str
    root: str
    usable: bool
    rows: int
    readable: int
    missing: int
    unreadable: int
    masks_found: int
    masks_missing: int
    masks_unreadable: int
    rejected: int
    rejected_reasons: dict[str, int]
    classes: list[ClassCount]
    problems: list[dict] = field(default_factory=list)  # first SHOWN: image_id, path, reason
    warnings: list[str] = field(default_factory=list)
    mask_estimation: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def check_dataset(dataset: Dataset, deep: bool = False, estimate_masks: int = 0, workers: int = 4) -> CheckReport:
    """Open every image and mask of ``dataset``; count what is usable."""
    manifest = dataset.manifest
    records = manifest[["image_id", "path", "mask_path"]].to_dict("records")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = list(pool.map(lambda r: _inspect(r, deep), records))
    image_ok = np.array([o[0] is None for o in outcomes], dtype=bool)
    mask_state = [o[1] for o in outcomes]
    problems = [
        {"image_id": r["image_id"], "path": r["path"], "reason": reason}
        for r, o in zip(records, outcomes)
        for reason in o
        if reason not in (None, "ok", "none")
    ]
    missing = sum(1 for o in outcomes if o[0] is not None and o[0].startswith("file not found"))
    classes = _per_class(dataset, image_ok, mask_state)
    reasons = dataset.rejected["reason"].str.replace(r" \(first seen at row \d+\)", "", regex=True).value_counts()
    report = CheckReport(
        dataset=dataset.name,
        root=str(dataset.root),
        usable=bool(image_ok.any()),
        rows=len(manifest),
        readable=int(image_ok.sum()),
        missing=missing,
        unreadable=int((~image_ok).sum()) - missing,
        masks_found=sum(s == "ok" for s in mask_state),
        masks_missing=sum(s == "none" for s in mask_state),
        masks_unreadable=sum(s not in ("ok", "none") for s in mask_state),
        rejected=len(dataset.rejected),
        rejected_reasons={str(k): int(v) for k, v in reasons.items()},
        classes=classes,
        problems=problems[:SHOWN],
        warnings=list(dataset.warnings),
    )
    if estimate_masks:
        report.mask_estimation = _estimation_quality(records, image_ok, mask_state, estimate_masks)
    return report


def _inspect(record: dict, deep: bool) -> tuple[str | None, str]:
    """(image problem or None, mask state: 'ok', 'none' or a problem)."""
    try:
        size = decode_image(record["path"]).shape[:2] if deep else image_size(record["path"])
        image_problem = None
    except DecodeError as exc:
        size, image_problem = None, str(exc)
    if not record["mask_path"]:
        return image_problem, "none"
    if size is None:
        return image_problem, "ok"  # the image's problem is the one to fix first
    try:
        decode_mask(record["mask_path"], size)
        return image_problem, "ok"
    except DecodeError as exc:
        return image_problem, f"mask: {exc}"


def _per_class(dataset: Dataset, image_ok: np.ndarray, mask_state: list[str]) -> list[ClassCount]:
    frame = dataset.manifest.assign(_ok=image_ok, _mask=[s == "ok" for s in mask_state])
    counts = []
    for label, name in enumerate(dataset.classes):
        rows = frame[frame["label"] == label]
        counts.append(
            ClassCount(
                label=label,
                label_name=name,
                full_name=dataset.class_names.get(name, name),
                images=len(rows),
                lesions=int(rows["group"].nunique()),
                readable=int(rows["_ok"].sum()),
                masks=int(rows["_mask"].sum()),
            )
        )
    return counts


def _estimation_quality(records: list[dict], image_ok: np.ndarray, mask_state: list[str], limit: int) -> dict:
    """Mean IoU of estimated masks against the provided ones, on up to ``limit`` images."""
    chosen = [r for r, ok, m in zip(records, image_ok, mask_state) if ok and m == "ok"][:limit]
    scores = []
    for record in chosen:
        image = decode_image(record["path"])
        truth = decode_mask(record["mask_path"], image.shape[:2])
        score = mask_iou(estimate_lesion_mask(image), truth)
        if score is not None:
            scores.append(score)
    return {
        "images": len(scores),
        "mean_iou": float(np.mean(scores)) if scores else None,
        "median_iou": float(np.median(scores)) if scores else None,
    }


def format_report(report: CheckReport) -> str:
    """Plain lines for a terminal or a CI log."""
    lines = [
        f"dataset {report.dataset} at {report.root}",
        f"  images: {report.rows} listed, {report.readable} readable, "
        f"{report.missing} missing, {report.unreadable} unreadable",
        f"  masks: {report.masks_found} found, {report.masks_missing} without mask, "
        f"{report.masks_unreadable} unreadable",
        f"  rejected rows: {report.rejected}"
        + "".join(f"\n    {n} x {reason}" for reason, n in report.rejected_reasons.items()),
        "  class                 images  lesions  readable  masks",
    ]
    for c in report.classes:
        lines.append(f"  {c.label_name:<20}{c.images:>8}{c.lesions:>9}{c.readable:>10}{c.masks:>7}")
    if report.mask_estimation:
        estimation = report.mask_estimation
        if estimation["mean_iou"] is not None:
            lines.append(
                f"  estimated masks vs provided: mean IoU {estimation['mean_iou']:.3f} on {estimation['images']} images"
            )
    for problem in report.problems:
        lines.append(f"  problem: {problem['image_id']}: {problem['reason']}")
    hidden = report.missing + report.unreadable + report.masks_unreadable - len(report.problems)
    if hidden > 0:
        lines.append(f"  ... and {hidden} more problems (--json lists the first {SHOWN})")
    lines += [f"  warning: {w}" for w in report.warnings]
    lines.append("  verdict: " + ("usable" if report.usable else "UNUSABLE: no image can be read"))
    return "\n".join(lines)
