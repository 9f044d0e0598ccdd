"""Synthetic dermoscopy-like lesions, written in the exact HAM10000 layout, with planted shortcuts.

Each of the seven HAM10000 classes has a visible signature on the lesion itself: colour,
shape (how irregular the outline is), border (sharp or diffuse) and texture (mottling, dots,
streaks). A lesion (``lesion_id``) is drawn once and photographed one to several times with a
small shift, rotation, scale and exposure change, like the real release.

A :class:`Shortcut` plants an artefact that correlates with a class: a colour patch in a
corner, ruler marks along the bottom edge, a surgical-ink mark beside the lesion, or dark
corners (a dermoscope's vignette). It appears on images of its class with probability
``correlation`` and on other images with probability ``leak``; with ``only_signal`` the
lesions of that class borrow the appearance of the other classes, so the artefact is the only
way to tell it apart. Artefacts never touch the lesion mask: a model that uses them looks off
the object.

Everything is deterministic given the seed. ``synthetic.json`` beside the metadata records the
spec and which images carry which artefact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from audit.data.ham10000 import CLASSES, MASK_FOLDER, METADATA_FILE

ShortcutKind = Literal["patch", "ruler", "ink", "dark_corners"]
SHORTCUT_KINDS: tuple[str, ...] = ("patch", "ruler", "ink", "dark_corners")
IMAGE_FOLDER = "HAM10000_images_part_1"
SPEC_FILE = "synthetic.json"


@dataclass(frozen=True)
class Shortcut:
    kind: ShortcutKind
    correlation: float = 1.0  # P(artefact | image of this class)
    leak: float = 0.0  # P(artefact | image of another class)
    only_signal: bool = False  # the class's lesions look like the other classes'

    def __post_init__(self) -> None:
        if self.kind not in SHORTCUT_KINDS:
            raise ValueError(f"unknown shortcut {self.kind!r}; expected one of {', '.join(SHORTCUT_KINDS)}")
        for name in ("correlation", "leak"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1]")


@dataclass(frozen=True)
class Appearance:
    """What a class's lesions look like."""

    colour: tuple[int, int, int]
    irregularity: float  # amplitude of the outline's harmonics, relative to the radius
    softness: float  # width of the border, relative to the radius
    mottling: float  # amplitude of low-frequency colour variation
    dots: int  # dark globules inside the lesion
    size: float  # radius, as a fraction of the image's shorter side


APPEARANCE: dict[str, Appearance] = {
    "akiec": Appearance((196, 92, 96), 0.10, 0.30, 0.30, 0, 0.26),
    "bcc": Appearance((222, 150, 165), 0.05, 0.45, 0.10, 0, 0.24),
    "bkl": Appearance((168, 122, 78), 0.05, 0.06, 0.20, 0, 0.30),
    "df": Appearance((120, 78, 60), 0.02, 0.50, 0.05, 0, 0.18),
    "mel": Appearance((55, 35, 30), 0.22, 0.12, 0.45, 6, 0.30),
    "nv": Appearance((112, 72, 48), 0.02, 0.10, 0.05, 0, 0.24),
    "vasc": Appearance((150, 30, 60), 0.07, 0.05, 0.15, 4, 0.20),
}
DX_TYPES = ("histo", "follow_up", "consensus", "confocal")
SEXES = ("male", "female", "unknown")
SITES = ("back", "lower extremity", "trunk", "upper extremity", "abdomen", "face", "chest", "foot", "scalp", "neck")


@dataclass(frozen=True)
class SyntheticSpec:
    images: int = 700
    height: int = 96
    width: int = 128
    max_images_per_lesion: int = 3
    class_weights: Mapping[str, float] = field(default_factory=lambda: {name: 1.0 for name in CLASSES})
    shortcuts: Mapping[str, Shortcut] = field(default_factory=dict)
    jpeg_quality: int = 90
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.class_weights) - set(CLASSES) | set(self.shortcuts) - set(CLASSES)
        if unknown:
            raise ValueError(f"unknown classes {sorted(unknown)}; expected {', '.join(CLASSES)}")
        if self.images < 1 or self.height < 32 or self.width < 32:
            raise ValueError("need at least one image of at least 32x32 pixels")

    def to_json(self) -> dict:
        data = asdict(self)
        data["class_weights"] = dict(self.class_weights)
        data["shortcuts"] = {name: asdict(s) for name, s in self.shortcuts.items()}
        return data


# The out-of-the-box dataset: dermatofibroma is recognisable only by a green sticker in the
# corner, every other class by its lesion.
DEFAULT_SPEC = SyntheticSpec(shortcuts={"df": Shortcut("patch", correlation=1.0, only_signal=True)})


def generate(dest: Path, spec: SyntheticSpec = SyntheticSpec(), workers: int | None = None) -> Path:
    """Write the dataset under ``dest`` (metadata CSV, JPEGs, masks, synthetic.json); return ``dest``.

    Lesions are drawn in parallel processes; each lesion has its own random stream
    (seeded by ``(seed, lesion)``), so the output does not depend on ``workers``.
    """
    dest = Path(dest)
    (dest / IMAGE_FOLDER).mkdir(parents=True, exist_ok=True)
    (dest / MASK_FOLDER).mkdir(parents=True, exist_ok=True)
    plan = _plan(spec)
    workers = workers or min(os.cpu_count() or 1, 8)
    chunks = [plan[i::workers] for i in range(workers)]
    if workers == 1:
        results = [_draw_lesions(dest, spec, chunks[0])]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_draw_lesions, [dest] * workers, [spec] * workers, chunks))
    rows = sorted(row for rows, _ in results for row in rows)
    planted = dict(sorted(item for _, marks in results for item in marks.items()))
    header = "lesion_id,image_id,dx,dx_type,age,sex,localization"
    (dest / METADATA_FILE).write_text("\n".join([header, *(line for _, line in rows)]) + "\n", encoding="utf-8")
    (dest / SPEC_FILE).write_text(json.dumps({"spec": spec.to_json(), "planted": planted}, indent=1), encoding="utf-8")
    return dest


def _plan(spec: SyntheticSpec) -> list[tuple[int, str, int, int]]:
    """(lesion, class, first image number, number of images) until ``spec.images`` are planned."""
    rng = np.random.default_rng(spec.seed)
    names = [n for n in CLASSES if spec.class_weights.get(n, 0) > 0]
    weights = np.array([spec.class_weights[n] for n in names], dtype=float)
    weights /= weights.sum()
    plan, planned = [], 0
    while planned < spec.images:
        count = min(int(rng.integers(1, spec.max_images_per_lesion + 1)), spec.images - planned)
        plan.append((len(plan), names[int(rng.choice(len(names), p=weights))], planned, count))
        planned += count
    return plan


def _draw_lesions(dest: Path, spec: SyntheticSpec, lesions: list[tuple[int, str, int, int]]):
    """Draw and write some lesions; return ([(image number, metadata line)], {image_id: artefacts})."""
    rows, planted = [], {}
    for lesion, label_name, first, count in lesions:
        rng = np.random.default_rng([spec.seed, lesion])
        look = _lesion_look(label_name, spec, rng)
        meta = _patient(rng)
        for number in range(first, first + count):
            image_id = f"ISIC_{number:07d}"
            image, mask = _photograph(look, spec, rng)
            artefacts = _plant(image, mask, label_name, spec, rng)
            Image.fromarray(image).save(dest / IMAGE_FOLDER / f"{image_id}.jpg", quality=spec.jpeg_quality)
            Image.fromarray(mask.astype(np.uint8) * 255).save(dest / MASK_FOLDER / f"{image_id}_segmentation.png")
            rows.append((number, f"HAM_{lesion:07d},{image_id},{label_name},{meta}"))
            if artefacts:
                planted[image_id] = artefacts
    return rows, planted


@dataclass
class _Look:
    appearance: Appearance
    harmonics: np.ndarray  # (4, 2): amplitude, phase of outline harmonics 2..5
    texture: np.ndarray  # (6, 8) low-frequency field
    dots: np.ndarray  # (n, 3): angle, relative distance, relative radius


def _lesion_look(label_name: str, spec: SyntheticSpec, rng: np.random.Generator) -> _Look:
    shortcut = spec.shortcuts.get(label_name)
    if shortcut is not None and shortcut.only_signal:
        others = [n for n in CLASSES if n != label_name]
        label_name = others[int(rng.integers(len(others)))]
    base = APPEARANCE[label_name]
    jitter = rng.normal(0, 10, 3)
    appearance = Appearance(
        tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(base.colour, jitter)),
        base.irregularity,
        base.softness,
        base.mottling,
        base.dots,
        base.size * rng.uniform(0.85, 1.15),
    )
    harmonics = np.stack([rng.uniform(0.3, 1.0, 4) * base.irregularity, rng.uniform(0, 2 * np.pi, 4)], axis=1)
    dots = np.stack(
        [rng.uniform(0, 2 * np.pi, base.dots), rng.uniform(0, 0.7, base.dots), rng.uniform(0.06, 0.12, base.dots)],
        axis=1,
    )
    return _Look(appearance, harmonics, rng.normal(0, 1, (6, 8)), dots)


def _photograph(look: _Look, spec: SyntheticSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One image of the lesion: RGB uint8 and its bool mask."""
    h, w = spec.height, spec.width
    a = look.appearance
    yy, xx = _grid(h, w)
    cy, cx = h / 2 + rng.normal(0, 0.04 * h), w / 2 + rng.normal(0, 0.04 * w)
    radius = a.size * min(h, w) * rng.uniform(0.93, 1.07)
    rotation = rng.uniform(0, 2 * np.pi)
    dy, dx = yy - np.float32(cy), xx - np.float32(cx)
    distance = np.hypot(dy, dx)
    angle = np.arctan2(dy, dx) + np.float32(rotation)
    outline = np.full_like(distance, radius)
    for k, (amplitude, phase) in enumerate(look.harmonics):
        outline += np.float32(radius * amplitude) * np.cos((k + 2) * angle + np.float32(phase))
    softness = max(a.softness * radius, 0.75)
    alpha = np.clip((outline - distance) / np.float32(softness) + np.float32(0.5), 0, 1)
    mask = alpha >= 0.5

    texture = _smooth(look.texture, h, w)
    lesion = np.asarray(a.colour, dtype=np.float32) * (1 + np.float32(a.mottling * 0.5) * texture[:, :, None])
    for theta, rel_distance, rel_radius in look.dots:
        py = cy + np.sin(theta - rotation) * rel_distance * radius
        px = cx + np.cos(theta - rotation) * rel_distance * radius
        lesion[(yy - np.float32(py)) ** 2 + (xx - np.float32(px)) ** 2 < (rel_radius * radius) ** 2] *= 0.45
    skin = np.asarray([224, 178, 150], dtype=np.float32) + rng.normal(0, 8, 3).astype(np.float32)
    background = skin * (1 + np.float32(0.04) * _smooth(rng.normal(0, 1, (4, 5)), h, w)[:, :, None])
    weight = alpha[:, :, None]
    image = (background * (1 - weight) + lesion * weight) * np.float32(rng.uniform(0.9, 1.1))
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(3)
    return np.clip(image, 0, 255).astype(np.uint8), mask


@cache
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy, xx


def _smooth(field_: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(field_.astype(np.float32), mode="F").resize((w, h), Image.Resampling.BICUBIC))


def _plant(
    image: np.ndarray, mask: np.ndarray, label_name: str, spec: SyntheticSpec, rng: np.random.Generator
) -> list[str]:
    """Draw the artefacts this image gets, in place, off the lesion; return their kinds."""
    planted = []
    for owner, shortcut in spec.shortcuts.items():
        chance = shortcut.correlation if owner == label_name else shortcut.leak
        if rng.random() < chance:
            _DRAW[shortcut.kind](image, mask, rng)
            planted.append(shortcut.kind)
    return planted


def _draw_patch(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    """A saturated colour sticker in the bottom-right corner."""
    h, w = mask.shape
    side = max(4, int(0.2 * min(h, w)))
    region = (slice(h - side - 2, h - 2), slice(w - side - 2, w - 2))
    colour = np.array([40, 170, 80]) + rng.integers(-15, 16, 3)
    image[region][~mask[region]] = colour


def _draw_ruler(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    """A pale strip with dark tick marks along the bottom edge."""
    h, w = mask.shape
    strip = max(4, int(0.1 * h))
    region = np.zeros_like(mask)
    region[h - strip :, :] = True
    image[region & ~mask] = (235, 235, 225)
    step = max(3, w // 16)
    offset = int(rng.integers(0, step))
    ticks = np.zeros_like(mask)
    for x in range(offset, w, step):
        ticks[h - strip : h - strip // 2 if (x // step) % 2 else h - 1, x] = True
    image[ticks & ~mask] = (30, 30, 30)


def _draw_ink(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    """A violet surgical-marker arc in the top-left, clear of the lesion."""
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = 0.2 * h + rng.normal(0, 1), 0.15 * w + rng.normal(0, 1)
    r = 0.12 * min(h, w)
    ring = np.abs(np.hypot(yy - cy, xx - cx) - r) < max(1.0, 0.025 * min(h, w))
    image[ring & ~mask] = (90, 40, 140)


def _draw_dark_corners(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    """The round field of a dermoscope: everything outside a circle goes near-black."""
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w]
    outside = np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2)) > rng.uniform(0.95, 1.02)
    image[outside & ~mask] = (image[outside & ~mask] * 0.12).astype(np.uint8)


_DRAW = {"patch": _draw_patch, "ruler": _draw_ruler, "ink": _draw_ink, "dark_corners": _draw_dark_corners}


def _patient(rng: np.random.Generator) -> str:
    dx_type = DX_TYPES[int(rng.choice(4, p=[0.5, 0.3, 0.15, 0.05]))]
    age = float(rng.integers(1, 18) * 5)
    sex = SEXES[int(rng.choice(3, p=[0.54, 0.45, 0.01]))]
    site = SITES[int(rng.integers(len(SITES)))]
    return f"{dx_type},{age},{sex},{site}"


def parse_shortcut(text: str) -> tuple[str, Shortcut]:
    """``CLASS=KIND[:CORRELATION[:LEAK]][:only]`` -> (class, Shortcut), e.g. ``df=patch:1:0:only``."""
    owner, _, rest = text.partition("=")
    parts = rest.split(":") if rest else []
    only = bool(parts) and parts[-1] == "only"
    parts = parts[:-1] if only else parts
    if not owner or not parts or len(parts) > 3:
        raise ValueError(f"bad shortcut {text!r}: expected CLASS=KIND[:CORRELATION[:LEAK]][:only]")
    try:
        numbers = [float(p) for p in parts[1:]]
    except ValueError as exc:
        raise ValueError(f"bad shortcut {text!r}: correlation and leak must be numbers") from exc
    if owner not in CLASSES:
        raise ValueError(f"bad shortcut {text!r}: unknown class {owner!r}; expected one of {', '.join(CLASSES)}")
    return owner, Shortcut(parts[0], *numbers, only_signal=only)  # type: ignore[arg-type]


def load_spec(root: Path) -> dict | None:
    """The ``synthetic.json`` written with a dataset, or None."""
    path = Path(root) / SPEC_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
