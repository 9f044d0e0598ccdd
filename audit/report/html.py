"""report.html: one self-contained file for human review (Jinja2 template, inline CSS, JS and images).

Nothing is loaded from the network: pictures are data URIs, and a Content-Security-Policy
allows only those, the inline style and the one inline script (by its hash). Every string from
the data is escaped by Jinja2's autoescaping. The page reads fully with JavaScript off; the
script only adds sorting and filtering to the class table.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader
from PIL import Image

from audit.data.decode import DecodeError, decode_image, decode_mask
from audit.data.manifest import BOX_COLUMNS
from audit.data.masks import estimate_lesion_mask
from audit.explain.methods import METHODS
from audit.explain.metrics import LOCALIZED
from audit.report import figures
from audit.report.aggregate import ALL_PAIRS, GroupStats, counted_pairs, indicators, metadata_slices
from audit.report.compare import Comparison
from audit.report.flags import ICONS, STATUSES, ClassResult
from audit.report.guided import gallery_guided
from audit.report.load import RunData, class_mean_maps, map_array, read_maps
from audit.report.sanity import SanityView, stands
from audit.report.thresholds import Thresholds

GALLERY_FLAGGED = 8  # worst cases shown for a class with a flag
GALLERY_PASSING = 3  # and for a class without one
MAX_ERRORS_LISTED = 500
MAX_SLICE_VALUES = 12
SIZE_WARNING_BYTES = 20_000_000  # above this the file is slow to open and to attach to a ticket


@dataclass
class Card:
    """One gallery entry: the image with the mask contour, the image with its object hidden where
    the class answers without it, then one overlay per method."""

    image_id: str
    reasons: list[str]
    row: dict
    pred_name: str
    pictures: list[tuple[str, figures.Picture | None]] = field(default_factory=list)
    missing: str | None = None
    hidden_name: str | None = None  # the class predicted with the object hidden, shown beside it


def render_report(
    run: RunData,
    results: list[ClassResult],
    summary: dict,
    thresholds: Thresholds,
    gallery: int = GALLERY_FLAGGED,
    comparison: Comparison | None = None,
    sanity: SanityView | None = None,
) -> str:
    environment = Environment(
        loader=PackageLoader("audit.report"), autoescape=True, trim_blocks=True, lstrip_blocks=True
    )
    environment.filters.update(
        pct=_pct, num=_num, ci=_ci, delta=_delta, method=figures.method_title, kind=figures.kind_title
    )
    environment.globals["cluster_color"] = figures.cluster_color
    failing = sanity.failing if sanity else frozenset()
    environment.globals["stands"] = lambda method: stands(method, failing)
    script = resources.files("audit.report").joinpath("templates/report.js").read_text(encoding="utf-8")
    pairs = counted_pairs(run.proportional)
    flags = indicators(run.rows, thresholds, pairs)
    means = class_mean_maps(run.run_dir)
    cards, guided_missing = _gallery(run, results, flags, pairs, gallery)
    strategies = _strategy_panels(run, results)
    sections = [_class_section(run, result, flags, means, cards, thresholds) for result in results]
    for section in sections:
        section["strategies"] = strategies.get(section["anchor"])
    return environment.get_template("report.html.j2").render(
        run=run,
        info=run.info,
        summary=summary,
        thresholds=thresholds,
        results=results,
        counts={s: sum(r.status == s for r in results) for s in STATUSES},
        sections=sections,
        icons=ICONS,
        titles=figures.METHOD_TITLES,
        pairs=ALL_PAIRS,
        counted=pairs,
        localized=LOCALIZED,
        malignant=summary.get("malignant_vs_benign"),
        comparison=comparison,
        sanity=sanity,
        guided_missing=guided_missing,
        sanity_picture=figures.sanity_plot(sanity.steps) if sanity and sanity.steps else None,
        errors=_errors(run.rows),
        script=script,
        script_hash=base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii"),
    )


def _class_section(
    run: RunData, result: ClassResult, flags: pd.DataFrame, means: dict, cards: dict, thresholds: Thresholds
) -> dict:
    mask = _class_rows(run, result)
    rows = run.rows[mask & run.rows["status"].eq("ok")]
    histograms = None
    if len(rows):
        histograms = figures.histograms(
            {p: _values(rows, f"agree_spearman_{p}") for p in ALL_PAIRS},
            {m: _values(rows, f"energy_in_mask_{m}") for m in LOCALIZED},
            thresholds.agreement_min,
            thresholds.energy_min,
        )
    class_means = means.get((result.label, result.target_kind))
    heatmaps = figures.mean_heatmaps(class_means, len(rows), run.input_size) if class_means else None
    slices = []
    for column in run.metadata_columns:
        if _sliceable(run.rows[column]):
            table = metadata_slices(run.rows[mask], flags[mask], column, MAX_SLICE_VALUES)
            if len(table) > 1:
                slices.append((column, table.to_dict("records")))
    return {
        "result": result,
        "anchor": _anchor(result),
        "histograms": histograms,
        "heatmaps": heatmaps,
        "slices": slices,
        "cards": cards.get((result.label, result.target_kind), []),
    }


def _gallery(
    run: RunData, results: list[ClassResult], flags: pd.DataFrame, pairs: tuple[str, ...], cap: int
) -> tuple[dict[tuple[int, str], list[Card]], str | None]:
    """The worst cases of each class, interleaved: the most off-object rows, the least agreeing
    ones and, in a context-reliant class, the correct rows that keep the class with the object hidden.
    Also says why the cards have no guided maps, where they have none."""
    chosen: dict[tuple[int, str], list[Card]] = {}
    for result in results:
        limit = cap if result.flags else min(cap, GALLERY_PASSING)
        rows = run.rows[_class_rows(run, result) & run.rows["status"].eq("ok")]
        energy = pd.to_numeric(rows["energy_in_mask_consensus"], errors="coerce")
        agreement = pd.concat([pd.to_numeric(rows[f"agree_spearman_{p}"], errors="coerce") for p in pairs], axis=1)
        agreement = agreement.mean(axis=1) if len(pairs) else pd.Series(np.nan, index=rows.index)
        off = energy[flags.loc[rows.index, "off_object:consensus"].eq(1)].sort_values(kind="stable")
        low = agreement[flags.loc[rows.index, "low_agreement:all"].eq(1)].sort_values(kind="stable")
        kept = _kept_without_object(rows, result)
        if off.empty and low.empty and kept.empty:  # nothing below a threshold: show the lowest energies
            off = energy.dropna().sort_values(kind="stable")
        picked: dict[int, list[str]] = {}
        for index_kept, index_off, index_low in _zip_longest(list(kept.index), list(off.index), list(low.index)):
            for index, reason in (
                (index_kept, f"kept {result.label_name} with the object hidden ({_pct(kept.get(index_kept))})"),
                (index_off, f"energy in mask {_num(energy.get(index_off))}"),
                (index_low, f"agreement {_num(agreement.get(index_low))}"),
            ):
                if index is not None and (index in picked or len(picked) < limit):
                    picked.setdefault(index, []).append(reason)
            if len(picked) >= limit:
                break
        chosen[(result.label, result.target_kind)] = [
            Card(
                str(rows.at[i, "image_id"]),
                reasons,
                _plain(rows.loc[i]),
                _class_name(run, rows.at[i, "pred"]),
                hidden_name=_class_name(run, rows.at[i, "object_hidden_pred"]) if i in kept.index else None,
            )
            for i, reasons in picked.items()
        ]
    guided_missing = _draw_cards(run, [card for cards in chosen.values() for card in cards])
    return chosen, guided_missing


@dataclass
class StrategyView:
    """A class's strategy panel: the figure, and per cluster its examples (thumbnail with the
    clustered method's map on it, and the image id)."""

    picture: figures.Picture
    examples: dict[int, list[tuple[str, figures.Picture | None]]]


def _strategy_panels(run: RunData, results: list[ClassResult]) -> dict[str, StrategyView]:
    """One panel per class that was clustered, keyed by the class section's anchor."""
    clustered = [r for r in results if r.strategies is not None]
    ids = sorted({i for r in clustered for c in r.strategies.clusters for i in c.examples})
    maps = read_maps(run.run_dir, ids) if ids else None
    where = {}
    if maps is not None:
        keys = zip(maps.column("image_id").to_pylist(), maps.column("target_kind").to_pylist())
        where = {key: i for i, key in enumerate(keys)}
    paths = dict(zip(run.rows["image_id"].astype(str), run.rows["path"]))
    views = {}
    for result in clustered:
        strategies = result.strategies
        panels = [
            (c.index, f"{c.title}: {c.region}\n{100 * c.share:.0f}% ({c.n})", c.mean_map) for c in strategies.clusters
        ]
        embedded_labels = strategies.clustering.labels[strategies.clustering.embedded]
        picture = figures.strategy_panel(panels, run.input_size, strategies.clustering.embedding, embedded_labels)
        examples = {}
        for cluster in strategies.clusters:
            examples[cluster.index] = [
                (
                    image_id,
                    _example(paths.get(image_id), maps, where.get((image_id, result.target_kind)), strategies.method),
                )
                for image_id in cluster.examples
            ]
        views[_anchor(result)] = StrategyView(picture, examples)
    return views


def _example(path, maps, index: int | None, method: str) -> figures.Picture | None:
    """A thumbnail of the image with its map of ``method`` (or the consensus) on it."""
    try:
        rgb = decode_image(path)
    except (DecodeError, TypeError):
        return None
    saliency = None
    if index is not None:
        chosen = [m for m in METHODS if method in ("consensus", m)]
        found = [a for a in (map_array(maps, m, index) for m in chosen) if a is not None]
        if found:
            mean = np.mean(found, axis=0)
            span = mean.max() - mean.min()
            saliency = (mean - mean.min()) / span if span > 0 else np.zeros_like(mean)
    thumb = figures.thumbnail(rgb)
    return figures.jpeg(thumb if saliency is None else figures.overlay(thumb, saliency))


def _kept_without_object(rows: pd.DataFrame, result: ClassResult) -> pd.Series:
    """In a class flagged context-reliant: the target's probability with the object hidden of its
    correct rows that keep the class, highest first; empty otherwise."""
    if not any(f.kind == "context_reliance" for f in result.flags):
        return pd.Series(dtype=float)
    hidden = pd.to_numeric(rows["object_hidden_pred"], errors="coerce")
    kept = rows["correct"].eq(True) & hidden.eq(result.label)
    prob = pd.to_numeric(rows.loc[kept, "object_hidden_prob"], errors="coerce")
    return prob.sort_values(ascending=False, kind="stable")


def _draw_cards(run: RunData, cards: list[Card]) -> str | None:
    """Draw each card's pictures; returns why there are no guided maps, or None."""
    if not cards:
        return None
    maps = read_maps(run.run_dir, sorted({c.image_id for c in cards}))
    where = {
        (image_id, kind): i
        for i, (image_id, kind) in enumerate(
            zip(maps.column("image_id").to_pylist(), maps.column("target_kind").to_pylist())
        )
    }
    decoded: dict[int, np.ndarray] = {}
    for position, card in enumerate(cards):
        try:
            decoded[position] = decode_image(card.row["path"])
        except (DecodeError, TypeError) as exc:
            card.missing = f"image not available: {exc}"
    ready = sorted(decoded)
    guided, guided_missing = gallery_guided(
        run.info, [decoded[p] for p in ready], [int(cards[p].row["target"]) for p in ready]
    )
    for order, position in enumerate(ready):
        card, rgb = cards[position], decoded[position]
        thumb = figures.thumbnail(rgb)
        contour = _object_mask(card.row, rgb, run.input_size)
        card.pictures.append(("image", figures.jpeg(figures.outline(thumb, contour))))
        if card.hidden_name is not None:
            hidden = _object_hidden(rgb, contour, run.input_size)
            title = f"object hidden: {card.hidden_name}"
            card.pictures.append((title, None if hidden is None else figures.jpeg(figures.thumbnail(hidden))))
        index = where.get((card.image_id, card.row["target_kind"]))
        for method in METHODS:
            saliency = map_array(maps, method, index) if index is not None else None
            picture = (
                None if saliency is None else figures.jpeg(figures.outline(figures.overlay(thumb, saliency), contour))
            )
            card.pictures.append((figures.METHOD_TITLES[method], picture))
        for name, guided_maps in guided.items():
            picture = figures.jpeg(figures.guided_picture(guided_maps[order], thumb))
            card.pictures.append((figures.METHOD_TITLES[name], picture))
    return guided_missing


def _object_mask(row: dict, rgb: np.ndarray, input_size: tuple[int, int]) -> np.ndarray | None:
    """The mask the run scored against: the provided one, the estimate on the model-sized image, or a box."""
    try:
        if row.get("mask_source") == "provided" and isinstance(row.get("mask_path"), str):
            return decode_mask(row["mask_path"], rgb.shape[:2])
        if row.get("mask_source") == "estimated":
            h, w = input_size
            resized = np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))
            return estimate_lesion_mask(resized)
    except DecodeError:
        return None
    if all(isinstance(row.get(c), float) for c in BOX_COLUMNS):
        return figures.box_mask(rgb.shape[:2], tuple(row[c] for c in BOX_COLUMNS))
    return None


def _object_hidden(rgb: np.ndarray, mask: np.ndarray | None, input_size: tuple[int, int]) -> np.ndarray | None:
    """The image as the model saw it with its object hidden (the run's own counterfactual)."""
    import torch

    from audit.explain.evidence import counterfactuals, dilation_radius

    if mask is None:
        return None
    h, w = input_size
    resized = np.array(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))
    small = np.array(Image.fromarray(mask.astype(np.uint8)).resize((w, h), Image.Resampling.NEAREST)) > 0
    image = torch.from_numpy(resized).permute(2, 0, 1)[None].float() / 255
    hidden = counterfactuals(image, torch.from_numpy(small)[None], dilation_radius(input_size)).object_hidden
    return (hidden[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _plain(row: pd.Series) -> dict:
    """A row as a dict with missing values as None (pandas gives NaN, which a template prints)."""
    return {k: (None if v is None or (isinstance(v, float) and np.isnan(v)) else v) for k, v in row.items()}


def _class_name(run: RunData, index) -> str:
    try:
        return run.classes[int(index)]
    except (TypeError, ValueError, IndexError):
        return "?"


def _errors(rows: pd.DataFrame) -> dict:
    errors = rows[rows["status"].eq("error")]
    columns = ["image_id", "label_name", "target_kind", "error_stage", "error"]
    return {"count": len(errors), "rows": errors[columns].head(MAX_ERRORS_LISTED).to_dict("records")}


def malignant_summary(view: dict[str, GroupStats] | None) -> list[dict] | None:
    """The malignant-vs-benign view as plain records (summary.json and the HTML share it)."""
    if not view:
        return None
    return [
        {
            "group": name,
            "n": stats.n,
            "accuracy": stats.accuracy,
            "low_agreement": stats.rates["low_agreement"]["all"].to_dict(),
            "off_object": stats.rates["off_object"]["consensus"].to_dict(),
        }
        for name, stats in view.items()
    ]


def _class_rows(run: RunData, result: ClassResult) -> pd.Series:
    return run.class_rows(result.label, result.label_name, result.target_kind)


def _anchor(result: ClassResult) -> str:
    return f"class-{result.target_kind}-{result.label}"  # built from an index, never from data


def _sliceable(values: pd.Series) -> bool:
    distinct = values.dropna().nunique()
    numeric = pd.to_numeric(values.dropna(), errors="coerce").notna().all()
    return distinct > 1 and (numeric or distinct <= 50)


def _values(rows: pd.DataFrame, column: str) -> np.ndarray:
    return pd.to_numeric(rows[column], errors="coerce").to_numpy(dtype=float)


def _zip_longest(*lists: list):
    for i in range(max(map(len, lists))):
        yield tuple(items[i] if i < len(items) else None for items in lists)


def _pct(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "\u2013"
    return f"{100 * value:.0f}%"


def _num(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "\u2013"
    return f"{value:.{digits}f}"


def _delta(value) -> str:
    """A change of a rate in points: ``+12``, ``-3``, ``0``."""
    if value is None:
        return "\u2013"
    points = round(100 * value)
    return f"{points:+d}" if points else "0"


def _ci(rate: dict) -> str:
    low, high = rate["ci"]
    return "" if low is None else f"{100 * low:.0f}\u2013{100 * high:.0f}%"
