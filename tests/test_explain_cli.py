"""`audit explain`: one-off pictures and arrays from the run's engine and preprocessing; bad
images, methods and targets are one-line errors that write nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from audit.cli import main
from audit.data.decode import decode_image, resize_rgb
from audit.explain.engine import ExplainEngine
from audit.explain.metrics import upsample
from audit.models import load_checkpoint, load_model
from audit.models.checkpoint import save_random_checkpoint

CLASSES = ("akiec", "bcc", "df")
SIZE = (64, 64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_random_checkpoint(path, "resnet18", CLASSES, SIZE)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for name, folder in (("first", "df"), ("second", "bcc")):
        (root / folder).mkdir()
        path = root / folder / f"{name}.jpg"
        Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _explain(*args) -> object:
    return CliRunner().invoke(main, ["explain", *map(str, args)])


def test_writes_a_picture_per_image_and_the_maps_as_arrays(checkpoint, images, tmp_path):
    result = _explain(*images, "--checkpoint", checkpoint, "--npy", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    written = {p.name for p in (tmp_path / "out").iterdir()}
    methods = ("cam", "gradcam", "gradcampp", "guided-gradcam", "guided-gradcampp")
    assert written == {f"{stem}.png" for stem in ("first", "second")} | {
        f"{stem}.{m}.npy" for stem in ("first", "second") for m in methods
    }
    assert result.stdout.splitlines() == [str(tmp_path / "out" / name) for name in _order(methods)]
    picture = Image.open(tmp_path / "out" / "first.png")
    assert picture.width > 4 * picture.height  # the image and five overlays side by side, a caption above
    for m in ("cam", "gradcam", "gradcampp"):
        values = np.load(tmp_path / "out" / f"first.{m}.npy")
        assert values.shape == SIZE and values.dtype == np.float32 and 0 <= values.min() and values.max() <= 1
    guided = np.load(tmp_path / "out" / "first.guided-gradcampp.npy")
    assert guided.shape == (*SIZE, 3) and guided.dtype == np.float32 and np.abs(guided).max() > 0


def _order(methods):
    return [name for stem in ("first", "second") for name in (f"{stem}.png", *(f"{stem}.{m}.npy" for m in methods))]


def test_maps_are_the_engines_on_the_runs_preprocessing(checkpoint, images, tmp_path):
    assert _explain(images[0], "--checkpoint", checkpoint, "--npy", "--out", tmp_path).exit_code == 0
    loaded = load_checkpoint(checkpoint)
    pixels = np.array(resize_rgb(decode_image(images[0]), SIZE))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (loaded.mean, loaded.std))
    x = (torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255 - mean) / std
    expected = upsample(ExplainEngine(load_model(loaded), SIZE)(x).maps["gradcampp"], SIZE)[0].numpy()
    np.testing.assert_allclose(np.load(tmp_path / "first.gradcampp.npy"), expected, atol=1e-6)


@pytest.mark.parametrize(("target", "expected"), [("label", "df"), ("bcc", "bcc"), ("0", "akiec")])
def test_target_can_be_the_folders_label_or_a_named_class(checkpoint, images, tmp_path, target, expected):
    result = _explain(images[0], "--checkpoint", checkpoint, "--target", target, "--methods", "cam", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith(f"{images[0]}: {expected}, p = ")
    assert {p.name for p in tmp_path.iterdir()} == {"first.png"}


@pytest.mark.parametrize(
    ("make", "options", "message"),
    [
        (lambda d: d / "missing.jpg", [], "no such image file"),
        (lambda d: _write(d / "text.jpg", b"plain text"), [], "text.jpg: "),
        (lambda d: _write(d / "empty.png", b""), [], "empty.png: "),
        (lambda d: None, ["--methods", "cam,saliency"], "unknown method 'saliency'"),
        (lambda d: None, ["--target", "nv"], "--target 'nv'"),
        (lambda d: None, ["--target", "label"], "not in a folder named after one of the model's classes"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(checkpoint, images, tmp_path, make, options, message):
    bad = make(tmp_path)
    extra = [bad] if bad is not None else []
    image = images[0] if bad is not None else images[0].parent.parent / "outside.jpg"
    if bad is None:
        Image.new("RGB", (40, 30)).save(image)
    result = _explain(image, *extra, "--checkpoint", checkpoint, *options, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_images_that_would_overwrite_each_other_are_refused(checkpoint, images, tmp_path):
    twin = tmp_path / "first.jpg"
    twin.write_bytes(images[0].read_bytes())
    result = _explain(images[0], twin, "--checkpoint", checkpoint, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "the same first.png" in result.stderr


def test_a_model_without_relus_has_no_guided_maps(tmp_path, images):
    path = tmp_path / "convnext.pt"
    save_random_checkpoint(path, "convnext_tiny", CLASSES, SIZE)
    asked = _explain(images[0], "--checkpoint", path, "--methods", "guided-gradcampp", "--out", tmp_path / "a")
    assert asked.exit_code == 2 and "nn.ReLU" in asked.stderr
    default = _explain(images[0], "--checkpoint", path, "--npy", "--out", tmp_path / "b")
    assert default.exit_code == 0, default.output
    assert {p.name for p in (tmp_path / "b").iterdir()} == {"first.png", "first.gradcam.npy", "first.gradcampp.npy"}


def _write(path, data: bytes):
    path.write_bytes(data)
    return path
