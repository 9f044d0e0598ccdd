"""`audit train`: fine-tune a torchvision classifier on a dataset and write a cam-audit checkpoint.

* Splits are grouped by ``group`` (HAM10000's ``lesion_id``: photos of one lesion never land on
  both sides) and stratified by class: within each class, whole groups go to test, then
  validation, until each holds its share of the class's images; the rest train.
* Class imbalance: cross-entropy weighted by inverse class frequency (``n / (k * n_c)``). A
  balanced sampler would show the 115 HAM10000 dermatofibromas some 60 times per epoch and the
  model would memorise them; weighting keeps every image once per epoch.
* Images are resized to the input size without cropping (as `audit run` does), then augmented
  with flips (a dermoscopy image has no up or left) and a colour jitter. No crop and no rotation:
  a crop cuts away corners and a rotation fills them with black, and the corners are where
  rulers, stickers and vignettes sit: the model should meet them as the audit will. (Measured on
  the demo's data: with a 15-degree affine jitter the model never learnt the planted corner
  patch in 10 epochs; without it, in 4.)
* AdamW with a one-cycle learning rate; on a GPU, bfloat16 autocast and channels_last. The
  epoch with the best validation macro-F1 is kept and evaluated once on the test split.
* ImageNet weights come from ``--weights PATH`` or torchvision's cache; nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from audit.data import load_dataset
from audit.data.decode import DecodeError, decode_image, image_size
from audit.errors import AuditError, CheckpointError
from audit.models.checkpoint import build_model, save_checkpoint
from audit.models.source import read_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "val", "test")
CACHE_LIMIT_BYTES = 2 * 1024**3  # decoded, resized images are kept in memory below this


class TrainError(AuditError):
    """Training cannot start: a dataset too small to split, weights that do not fit, ..."""


@dataclass(frozen=True)
class TrainConfig:
    """``weights``: ``imagenet`` (torchvision's cache), ``none`` (random init) or a file path."""

    dataset: str
    arch: str
    out: str
    data_dir: str | None = None
    image_size: int = 224
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    weights: str = "imagenet"
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    workers: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.image_size < 32:
            raise TrainError("epochs and batch_size must be >= 1 and image_size >= 32")
        if not (0 < self.val_fraction < 0.5 and 0 < self.test_fraction < 0.5):
            raise TrainError("val_fraction and test_fraction must be in (0, 0.5)")


@dataclass
class TrainResult:
    checkpoint: Path
    evaluation: Path
    test: dict


def split_by_group(manifest: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.Series:
    """``train`` / ``val`` / ``test`` for each row; all rows of one group share a split.

    Within each class (a group's class is its most common label), groups in random order fill
    test, then validation, until each holds its fraction of the class's images."""
    rng = np.random.default_rng(seed)
    groups = manifest["group"].where(manifest["group"].notna() & manifest["group"].astype(str).ne(""))
    groups = groups.fillna("image:" + manifest["image_id"].astype(str))
    sizes = groups.value_counts()
    group_label = manifest.groupby(groups)["label"].agg(lambda s: s.mode().iloc[0])
    assignment: dict[str, str] = {}
    for _, members in group_label.groupby(group_label):
        names = list(members.index)
        rng.shuffle(names)
        total = int(sizes[names].sum())
        targets = {"test": test_fraction * total, "val": val_fraction * total}
        filled = {"test": 0, "val": 0}
        for name in names:
            split = "train"
            if len(names) >= 3:  # a class needs a group on every side to be measured at all
                split = next((s for s in ("test", "val") if filled[s] < targets[s]), "train")
            if split != "train":
                filled[split] += int(sizes[name])
            assignment[name] = split
    return groups.map(assignment).rename("split")


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """``n / (k * n_c)`` for each class present (1 for a balanced dataset); 0 for absent classes."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """Per-class precision, recall, F1 and support; accuracy, macro-F1, balanced accuracy and the
    confusion matrix (rows: true class, columns: predicted). Undefined ratios (0/0) count as 0."""
    k = len(classes)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    tp = np.diag(confusion).astype(float)
    predicted, support = confusion.sum(axis=0), confusion.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    present = support > 0
    return {
        "accuracy": float(tp.sum() / max(confusion.sum(), 1)),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "per_class": {
            name: {
                "precision": round(float(precision[i]), 4),
                "recall": round(float(recall[i]), 4),
                "f1": round(float(f1[i]), 4),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": confusion.tolist(),
    }


def imagenet_weights_file(arch: str) -> Path:
    """Where torchvision keeps ``arch``'s default ImageNet weights once downloaded."""
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def load_pretrained(model: nn.Module, weights: str, arch: str) -> str:
    """Load ``weights`` (imagenet|none|PATH) into ``model`` but for its new classifier; say what was done.

    A file may be ``.safetensors`` or a torch state dict (:func:`audit.models.source.read_weights`).
    ``imagenet`` is torchvision's cached download; timm's pretrained weights live on the Hugging
    Face hub, so a ``timm:`` arch takes them as a file."""
    if weights == "none":
        return "random initialisation"
    if weights == "imagenet" and arch.startswith("timm:"):
        raise TrainError(
            f"timm's ImageNet weights for {arch} come from the Hugging Face hub: download the model's "
            "model.safetensors on a machine with internet and pass --weights FILE, or --weights none for random init"
        )
    arch = arch.removeprefix("torchvision:")
    path = imagenet_weights_file(arch) if weights == "imagenet" else Path(weights)
    if not path.is_file():
        if weights == "imagenet":
            fetch = f"torchvision.models.get_model('{arch}', weights='DEFAULT')"
            raise TrainError(
                f"ImageNet weights for {arch} are not in torchvision's cache ({path}). On a machine with "
                f'internet: python -c "import torchvision; {fetch}" and copy {path.name} to {path.parent}; '
                "or pass --weights FILE, or --weights none for random init"
            )
        raise TrainError(f"weights file not found: {path}")
    try:
        state = read_weights(path)
    except CheckpointError as exc:
        raise TrainError(f"cannot read weights {exc}") from exc
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    left_out = [k for k in own if k not in fitting and not k.endswith("num_batches_tracked")]
    if len(left_out) > 2:  # the new classifier's weight and bias, nothing else
        raise TrainError(f"{path} does not hold {arch} weights: {len(left_out)} tensors do not fit, e.g. {left_out[0]}")
    model.load_state_dict(fitting, strict=False)
    return f"{path.name} ({len(fitting)} tensors; new classifier: {', '.join(left_out) or 'none'})"


class ImageTable(torch.utils.data.Dataset):
    """Rows of a manifest as (uint8 CHW tensor at the input size, label); decoded once when cached."""

    def __init__(self, paths: list[str], labels: list[int], size: tuple[int, int], transform, cache: bool) -> None:
        self.paths, self.labels, self.size, self.transform = paths, labels, size, transform
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.cache.get(index) if self.cache is not None else None
        if image is None:
            h, w = self.size
            try:
                decoded = decode_image(self.paths[index])
            except DecodeError as exc:
                raise TrainError(f"{self.paths[index]}: {exc}") from exc
            rgb = Image.fromarray(decoded).resize((w, h), Image.Resampling.BILINEAR)
            image = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)
            if self.cache is not None:
                self.cache[index] = image
        return self.transform(image), self.labels[index]


def train_model(config: TrainConfig, progress: Callable[[str], None] | None = None) -> TrainResult:
    """Train, keep the best validation epoch, evaluate it on test, write checkpoint and evaluation."""
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    torch.manual_seed(config.seed)
    dataset = load_dataset(config.dataset, config.data_dir)
    manifest = _readable(dataset.manifest, say)
    classes = list(dataset.classes)
    manifest = manifest.assign(split=split_by_group(manifest, config.val_fraction, config.test_fraction, config.seed))
    sizes = manifest["split"].value_counts()
    if any(sizes.get(s, 0) == 0 for s in SPLITS):
        raise TrainError(f"{len(manifest)} images cannot be split into train, val and test by group")
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    size = (config.image_size, config.image_size)
    model = build_model(config.arch, len(classes), size)
    origin = load_pretrained(model, config.weights, config.arch)
    model = model.to(device, memory_format=torch.channels_last if on_gpu else torch.contiguous_format)
    loaders = _loaders(manifest, size, config)
    say(
        f"train: {config.arch} at {size[0]}x{size[1]} from {origin}; "
        f"{sizes['train']} train / {sizes['val']} val / {sizes['test']} test images, {len(classes)} classes, {device}"
    )
    train_labels = manifest.loc[manifest["split"] == "train", "label"].to_numpy()
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(train_labels, len(classes)).to(device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * len(loaders["train"]), pct_start=0.2
    )
    best, best_score, history = None, -1.0, []
    for epoch in range(1, config.epochs + 1):
        began = time.perf_counter()
        loss = _train_epoch(model, loaders["train"], loss_fn, optimizer, schedule, device, on_gpu)
        val = classification_metrics(*_predict(model, loaders["val"], device, on_gpu), classes)
        history.append({"epoch": epoch, "loss": round(loss, 4), "val_macro_f1": round(val["macro_f1"], 4)})
        say(
            f"epoch {epoch}/{config.epochs}: loss {loss:.3f}, val macro-F1 {val['macro_f1']:.3f}, "
            f"balanced accuracy {val['balanced_accuracy']:.3f} ({time.perf_counter() - began:.0f} s)"
        )
        if val["macro_f1"] > best_score:
            best_score, best = val["macro_f1"], copy.deepcopy(model.state_dict())
    model.load_state_dict(best)
    test = classification_metrics(*_predict(model, loaders["test"], device, on_gpu), classes)
    say(f"test: accuracy {test['accuracy']:.3f}, macro-F1 {test['macro_f1']:.3f} (best epoch by val macro-F1)")
    out = Path(config.out)
    save_checkpoint(
        out, model.cpu(), arch=config.arch, classes=classes, input_size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD
    )
    evaluation = out.with_suffix(".eval.json")
    report = {
        "config": asdict(config),
        "weights": origin,
        "splits": _split_counts(manifest, classes),
        "history": history,
        "best_val_macro_f1": round(best_score, 4),
        "test": test,
    }
    evaluation.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return TrainResult(out, evaluation, test)


def _readable(manifest: pd.DataFrame, say) -> pd.DataFrame:
    """Rows whose image header reads (missing, empty and non-image files are skipped and counted;
    a file that breaks later, when decoded, stops training with its path)."""

    def readable(path: str) -> bool:
        try:
            image_size(path)
            return True
        except DecodeError:
            return False

    ok = manifest["path"].map(readable)
    if not ok.all():
        say(f"train: skipping {int((~ok).sum())} images that cannot be read")
    return manifest[ok].reset_index(drop=True)


def _loaders(manifest: pd.DataFrame, size: tuple[int, int], config: TrainConfig) -> dict[str, DataLoader]:
    normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    augment = v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.1, hue=0.02),
            *normalize,
        ]
    )
    plain = v2.Compose(normalize)
    cache = len(manifest) * 3 * size[0] * size[1] < CACHE_LIMIT_BYTES and config.workers == 0
    loaders = {}
    for split in SPLITS:
        rows = manifest[manifest["split"] == split]
        table = ImageTable(
            rows["path"].tolist(), rows["label"].tolist(), size, augment if split == "train" else plain, cache
        )
        loaders[split] = DataLoader(
            table,
            batch_size=config.batch_size,
            shuffle=split == "train",
            num_workers=config.workers,
            generator=torch.Generator().manual_seed(config.seed),
            drop_last=split == "train" and len(table) > config.batch_size,
        )
    return loaders


def _train_epoch(model, loader, loss_fn, optimizer, schedule, device, on_gpu) -> float:
    model.train()
    total, count = 0.0, 0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if on_gpu:
            images = images.to(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        total += loss.item() * len(labels)
        count += len(labels)
    return total / max(count, 1)


@torch.no_grad()
def _predict(model, loader, device, on_gpu) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    truth, predicted = [], []
    for images, labels in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            logits = model(images.to(device))
        truth.append(labels.numpy())
        predicted.append(logits.argmax(1).cpu().numpy())
    return np.concatenate(truth), np.concatenate(predicted)


def _split_counts(manifest: pd.DataFrame, classes: list[str]) -> dict:
    counts = manifest.groupby(["split", "label"]).size()
    return {split: {name: int(counts.get((split, i), 0)) for i, name in enumerate(classes)} for split in SPLITS}
