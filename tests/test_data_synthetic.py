"""The synthetic generator: HAM10000 layout, determinism, planted shortcuts, estimated masks."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from audit.data import load_dataset
from audit.data.masks import estimate_lesion_mask, mask_iou
from audit.data.synthetic import APPEARANCE, Shortcut, SyntheticSpec, generate, load_spec, parse_shortcut


def _digest(root):
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    spec = SyntheticSpec(
        images=140,
        shortcuts={"df": Shortcut("patch", 1.0, 0.0, only_signal=True), "mel": Shortcut("ruler", 0.5, 0.1)},
        seed=3,
    )
    return generate(tmp_path_factory.mktemp("synthetic"), spec)


def test_layout_loads_as_ham10000(planted):
    dataset = load_dataset("synthetic", planted)
    manifest = dataset.manifest
    assert len(manifest) == 140 and dataset.rejected.empty
    assert manifest["mask_path"].notna().all()
    assert manifest["group"].nunique() < 140  # several images per lesion
    assert set(manifest["label_name"]) == set(dataset.classes)
    image = Image.open(manifest["path"][0])
    assert image.format == "JPEG" and image.size == (128, 96)


def test_deterministic_by_seed(tmp_path):
    spec = SyntheticSpec(images=12, shortcuts={"nv": Shortcut("ink", 0.5)}, seed=7)
    assert _digest(generate(tmp_path / "a", spec, workers=1)) == _digest(generate(tmp_path / "b", spec, workers=2))
    other = SyntheticSpec(images=12, shortcuts={"nv": Shortcut("ink", 0.5)}, seed=8)
    assert _digest(generate(tmp_path / "c", other)) != _digest(tmp_path / "a")


def test_shortcuts_follow_their_correlation_and_leak(planted):
    manifest = load_dataset("synthetic", planted).manifest
    marks = load_spec(planted)["planted"]
    kinds = manifest["image_id"].map(lambda i: marks.get(i, []))
    df = manifest["label_name"] == "df"
    assert kinds[df].map(lambda k: "patch" in k).all()
    assert not kinds[~df].map(lambda k: "patch" in k).any()
    mel = manifest["label_name"] == "mel"
    assert 0.25 < kinds[mel].map(lambda k: "ruler" in k).mean() < 0.75
    assert kinds[~mel].map(lambda k: "ruler" in k).mean() < 0.25


def test_artefacts_stay_off_the_lesion(planted):
    manifest = load_dataset("synthetic", planted).manifest
    for row in manifest[manifest["label_name"] == "df"].itertuples():
        image = np.asarray(Image.open(row.path)).astype(int)
        mask = np.asarray(Image.open(row.mask_path)) > 0
        corner = (slice(-19, -12), slice(-14, -6))  # above where a leaked ruler may run
        assert not mask[corner].any()
        assert (image[corner][..., 1] - image[corner][..., 0]).mean() > 80  # green sticker


def test_only_signal_lesions_look_like_other_classes(planted):
    manifest = load_dataset("synthetic", planted).manifest
    nearest = []
    for row in manifest[manifest["label_name"] == "df"].itertuples():
        image = np.asarray(Image.open(row.path)).astype(float)
        mask = np.asarray(Image.open(row.mask_path)) > 0
        colour = np.median(image[mask], axis=0)
        nearest.append(min(APPEARANCE, key=lambda name: np.linalg.norm(colour - APPEARANCE[name].colour)))
    assert np.mean([name != "df" for name in nearest]) > 0.6


def test_classes_are_told_apart_by_lesion_colour(planted):
    manifest = load_dataset("synthetic", planted).manifest
    hits = []
    for row in manifest[manifest["label_name"].isin(["bcc", "mel", "vasc", "nv"])].itertuples():
        image = np.asarray(Image.open(row.path)).astype(float)
        mask = np.asarray(Image.open(row.mask_path)) > 0
        colour = np.median(image[mask], axis=0)
        hits.append(
            min(("bcc", "mel", "vasc", "nv"), key=lambda n: np.linalg.norm(colour - APPEARANCE[n].colour))
            == row.label_name
        )
    assert np.mean(hits) > 0.8


def test_estimated_masks_match_the_true_ones(planted):
    manifest = load_dataset("synthetic", planted).manifest.head(60)
    scores = []
    for row in manifest.itertuples():
        image = np.asarray(Image.open(row.path))
        scores.append(mask_iou(estimate_lesion_mask(image), np.asarray(Image.open(row.mask_path)) > 0))
    assert np.mean(scores) > 0.85


def test_estimated_mask_of_a_blank_image_is_empty():
    assert not estimate_lesion_mask(np.full((40, 50, 3), 200, dtype=np.uint8)).any()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("df=patch", ("df", Shortcut("patch"))),
        ("mel=ruler:0.8:0.1", ("mel", Shortcut("ruler", 0.8, 0.1))),
        ("df=patch:1:0:only", ("df", Shortcut("patch", 1.0, 0.0, only_signal=True))),
    ],
)
def test_parse_shortcut(text, expected):
    assert parse_shortcut(text) == expected


@pytest.mark.parametrize("text", ["df", "xx=patch", "df=glitter", "df=patch:x", "df=patch:2"])
def test_parse_shortcut_rejects(text):
    with pytest.raises(ValueError):
        parse_shortcut(text)
