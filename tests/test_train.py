"""`audit train`: grouped stratified splits, class weights, metrics, weights loading, the command."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from audit.cli import main
from audit.data.synthetic import SyntheticSpec, generate
from audit.models import load_checkpoint
from audit.models.checkpoint import build_model
from audit.models.train import (
    TrainError,
    class_weights,
    classification_metrics,
    imagenet_weights_file,
    load_pretrained,
    split_by_group,
)


def _lesions(seed: int = 0) -> pd.DataFrame:
    """A HAM10000-like manifest: 7 imbalanced classes, 1-4 photos per lesion."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, lesions in enumerate([30, 50, 110, 12, 110, 600, 14]):
        for lesion in range(lesions):
            for photo in range(int(rng.integers(1, 5))):
                rows.append({"image_id": f"I{label}_{lesion}_{photo}", "label": label, "group": f"L{label}_{lesion}"})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_never_puts_one_lesion_on_both_sides(seed):
    manifest = _lesions(seed)
    split = split_by_group(manifest, 0.15, 0.15, seed)
    sides = manifest.assign(split=split).groupby("group")["split"].nunique()
    assert (sides == 1).all()
    assert set(split) == {"train", "val", "test"}


def test_split_is_stratified_by_class():
    manifest = _lesions()
    shares = manifest.assign(split=split_by_group(manifest, 0.15, 0.15, 0)).groupby("label")["split"]
    for label, splits in shares:
        counts = splits.value_counts(normalize=True)
        assert counts["test"] == pytest.approx(0.15, abs=0.12), label
        assert counts["val"] == pytest.approx(0.15, abs=0.12), label
        assert counts["train"] > 0.5


def test_rows_without_a_group_are_their_own_group():
    manifest = pd.DataFrame({"image_id": [f"i{i}" for i in range(40)], "label": [i % 2 for i in range(40)]})
    manifest["group"] = None
    split = split_by_group(manifest, 0.2, 0.2, 0)
    assert split.value_counts().to_dict() == {"train": 24, "test": 8, "val": 8}


def test_class_weights_are_inverse_frequency():
    weights = class_weights(np.array([0, 0, 0, 1, 2, 2]), 4)
    assert weights.tolist() == pytest.approx([6 / 9, 6 / 3, 6 / 6, 0.0])


def test_classification_metrics_known_values():
    truth = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 1, 0])
    metrics = classification_metrics(truth, predicted, ["a", "b", "c"])
    assert metrics["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["per_class"]["a"] == {
        "precision": pytest.approx(2 / 3, abs=1e-4),
        "recall": pytest.approx(2 / 3, abs=1e-4),
        "f1": pytest.approx(2 / 3, abs=1e-4),
        "support": 3,
    }
    assert metrics["per_class"]["c"]["f1"] == 0.0
    assert metrics["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0) / 3)


def test_pretrained_weights_load_all_but_the_new_classifier(tmp_path):
    imagenet = build_model("resnet18", 1000)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(imagenet.state_dict(), path)
    model = build_model("resnet18", 7)
    note = load_pretrained(model, str(path), "resnet18")
    assert "fc.weight" in note and "fc.bias" in note
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_mean, imagenet.layer4[1].bn2.running_mean)
    assert model.fc.out_features == 7


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "densenet.pth"
    torch.save(build_model("densenet121", 1000).state_dict(), path)
    with pytest.raises(TrainError, match="does not hold resnet18 weights"):
        load_pretrained(build_model("resnet18", 7), str(path), "resnet18")


def test_missing_imagenet_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert str(imagenet_weights_file("resnet50")).startswith(str(tmp_path))
    with pytest.raises(TrainError, match="not in torchvision's cache.*--weights none"):
        load_pretrained(build_model("resnet50", 7), "imagenet", "resnet50")


def test_train_command_writes_a_checkpoint_and_its_evaluation(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    data = generate(tmp_path / "syn", SyntheticSpec(images=90, height=32, width=40, seed=4), workers=1)
    out = tmp_path / "model.pt"
    command = ["train", "--dataset", "synthetic", "--data-dir", str(data), "--arch", "resnet18"]
    command += ["--image-size", "32", "--epochs", "1", "--batch-size", "16", "--out", str(out)]
    refused = CliRunner().invoke(main, command)
    assert refused.exit_code == 2 and "--weights none" in refused.output  # no ImageNet weights here
    result = CliRunner().invoke(main, [*command, "--weights", "none"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out)
    checkpoint = load_checkpoint(out)
    assert checkpoint.arch == "resnet18" and checkpoint.input_size == (32, 32) and len(checkpoint.classes) == 7
    evaluation = json.loads(out.with_suffix(".eval.json").read_text())
    assert set(evaluation["test"]) >= {"accuracy", "macro_f1", "balanced_accuracy", "per_class", "confusion_matrix"}
    assert sum(sum(counts.values()) for counts in evaluation["splits"].values()) == 90
    assert len(evaluation["history"]) == 1
