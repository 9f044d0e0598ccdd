"""Checkpoints in the cam-audit/1 format, and the automatic target layer and CAM head."""

from __future__ import annotations

import collections

import pytest
import torch

from audit.errors import CheckpointError, ModelAnatomyError
from audit.models import (
    CHECKPOINT_FORMAT,
    build_model,
    inspect_model,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from audit.models.checkpoint import sha256_file
from tests.conftest import random_images, random_model

CLASSES = ["akiec", "bcc", "bkl", "df", "mel"]
META = dict(arch="resnet18", classes=CLASSES, input_size=(64, 64), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture
def saved(tmp_path):
    model = random_model("resnet18", num_classes=5)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, **META)
    return model, path


def test_round_trip_gives_the_same_model(saved):
    model, path = saved
    checkpoint = load_checkpoint(path)
    assert checkpoint.classes == tuple(CLASSES) and checkpoint.input_size == (64, 64)
    assert checkpoint.mean == (0.5, 0.5, 0.5) and checkpoint.std == (0.25, 0.25, 0.25)
    loaded = load_model(checkpoint)
    assert not loaded.training
    images = random_images(2, 64)
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))


def test_sha256_is_stable(saved):
    _, path = saved
    assert sha256_file(path) == sha256_file(path) and len(sha256_file(path)) == 64


class Payload:
    """Stands for any object a hostile checkpoint could smuggle in a pickle."""


def test_arbitrary_objects_are_never_unpickled(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)


def _write(tmp_path, **changes):
    raw = {"format": CHECKPOINT_FORMAT, **META, "state_dict": random_model("resnet18").state_dict()}
    raw["classes"], raw["input_size"] = list(raw["classes"]), list(raw["input_size"])
    raw.update(changes)
    raw = {k: v for k, v in raw.items() if v is not None}
    path = tmp_path / "c.pt"
    torch.save(raw, path)
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format": None}, "missing keys format"),
        ({"format": "other/2"}, "not supported"),
        ({"classes": []}, "non-empty list"),
        ({"classes": ["a", "a", "b", "c", "d"]}, "duplicate"),
        ({"input_size": [64]}, "input_size"),
        ({"mean": [0.5, 0.5]}, "mean"),
        ({"std": [0.2, 0.0, 0.2]}, "positive"),
        ({"state_dict": {"w": [1, 2]}}, "state_dict"),
    ],
)
def test_invalid_checkpoints_get_clear_messages(tmp_path, changes, message):
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(_write(tmp_path, **changes))


def test_bare_state_dict_hints_at_the_format(tmp_path):
    path = tmp_path / "bare.pt"
    torch.save(random_model("resnet18").state_dict(), path)
    with pytest.raises(CheckpointError, match="bare state_dict"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_architecture(tmp_path):
    checkpoint = load_checkpoint(_write(tmp_path, classes=["a", "b", "c"]))
    with pytest.raises(CheckpointError, match="do not fit resnet18 with 3 classes"):
        load_model(checkpoint)


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(garbage)


def test_unknown_architecture():
    with pytest.raises(CheckpointError, match="unknown architecture"):
        build_model("fasterrcnn_resnet50_fpn", 3)


EXPECTED = {
    "resnet18": ("layer4", "fc", "identity"),
    "resnet50": ("layer4", "fc", "identity"),
    "densenet121": ("features", "classifier", "relu"),
    "mobilenet_v3_small": ("features", None, None),
    "efficientnet_b0": ("features", "classifier.1", "identity"),
    "convnext_tiny": ("features", None, None),
    "regnet_y_400mf": ("trunk_output", "fc", "identity"),
    "vgg11": ("features", None, None),
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_target_layer_and_cam_head_found_automatically(arch):
    layer, head, activation = EXPECTED[arch]
    anatomy = inspect_model(build_model(arch, 7), (64, 64))
    assert anatomy.target_layer == layer
    if head is None:
        assert anatomy.cam_head is None and anatomy.cam_note.startswith("CAM needs")
    else:
        assert anatomy.cam_head.name == head and anatomy.cam_head.activation == activation
        assert anatomy.cam_head.weight.shape == (7, anatomy.feature_shape[0])


def test_target_layer_override_and_cam_only_at_the_pooled_map():
    anatomy = inspect_model(random_model("resnet18"), (64, 64), target_layer="layer3")
    assert anatomy.target_layer == "layer3" and anatomy.feature_shape == (256, 4, 4)
    assert anatomy.cam_head is None and "layer4.0.conv1" in anatomy.cam_note


def test_classifier_override_must_be_linear():
    anatomy = inspect_model(random_model("resnet18"), (64, 64), classifier="avgpool")
    assert anatomy.cam_head is None and "AdaptiveAvgPool2d" in anatomy.cam_note
    assert inspect_model(random_model("resnet18"), (64, 64), classifier="fc").cam_head.name == "fc"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"target_layer": "layer9"}, "no module"), ({"target_layer": "fc"}, "outputs a 2x5 tensor, not a feature map")],
)
def test_bad_overrides(kwargs, message):
    with pytest.raises(ModelAnatomyError, match=message):
        inspect_model(random_model("resnet18"), (64, 64), **kwargs)


def test_model_that_does_not_return_logits():
    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 2, 3)

        def forward(self, x):
            return collections.namedtuple("Out", "a b")(self.conv(x), self.conv(x))

    with pytest.raises(ModelAnatomyError, match="logits"):
        inspect_model(Pair(), (16, 16))
