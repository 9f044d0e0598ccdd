"""The explain stage of the Ray Data job (GPU or CPU actors), after the read stage (:mod:`audit.pipeline.read`).

Both catch failures per row: a bad image or mask becomes an error row with its stage and
reason, and the rest of its batch carries on. Images arrive encoded and are decoded on the
actor's device (:mod:`audit.data.device_decode`); they stay uint8 until the model's input.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from audit.data.device_decode import decode_on_device
from audit.data.manifest import BOX_COLUMNS
from audit.errors import first_line
from audit.explain.engine import ExplainEngine, Explanation
from audit.explain.evidence import NO_MASK_NOTE, evidence_kinds, gather_evidence
from audit.explain.methods import METHODS
from audit.explain.metrics import MetricSettings, score_batch
from audit.explain.sanity import SanityCheck
from audit.models.checkpoint import Checkpoint, checkpoint_from_bytes, load_model
from audit.pipeline.read import read_batch, unpack_masks
from audit.pipeline.schema import to_table

PASS_THROUGH_SKIP = {"kinds", "payload", "payload_kind", "mask_bits", "mask_source", "decode_stage", "decode_error"}


def decode_rows(
    batch: dict[str, np.ndarray], size: tuple[int, int], device: torch.device | str
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """A read batch's images on ``device`` ((N, 3, h, w) uint8), its masks ((N, h, w) bool, False
    where a row has none), and per row the decode error ("" where it decoded)."""
    # A row the read stage failed (its image, or its mask) is not decoded: no kind, a zero image.
    kinds = ["" if stage else kind for kind, stage in zip(batch["payload_kind"], batch["decode_stage"])]
    images, failed = decode_on_device(batch["payload"], kinds, size, device)
    errors = np.full(len(kinds), "", dtype=object)
    for row, reason in failed.items():
        errors[row] = reason
    return images, unpack_masks(batch["mask_bits"], size), errors


@dataclass(frozen=True)
class Decoded:
    """A batch on the actor's device: images (N, 3, h, w) uint8; masks (N, h, w) bool and which rows have one."""

    images: torch.Tensor
    masks: np.ndarray
    has_mask: np.ndarray


class Explainer:
    """An actor holding one model: explains decoded batches and returns rows of the output table.

    ``mode="forward"`` computes predictions only (the throughput baseline of
    ``audit bench pipeline``). ``kill_after`` (``"N:marker-path"``) is a fault-injection hook
    for tests: the N-th batch SIGKILLs this worker process once, when the marker file does not
    exist yet. ``delay`` (seconds) slows every batch down, so a test can interrupt a run mid-way.
    ``device`` None: the worker's GPU when Ray gave it one, else the CPU (the driver's head start
    passes ``"cpu"``).
    """

    def __init__(
        self,
        checkpoint_ref: list,
        config: dict,
        schema: pa.Schema,
        threads: int | None = None,
        mode: str = "explain",
        kill_after: str | None = None,
        delay: float = 0.0,
        device: str | None = None,
    ) -> None:
        checkpoint, model, self.device = load_actor_model(checkpoint_ref, threads, device)
        self.engine = explain_engine(model, checkpoint, config)
        self.mean = torch.tensor(checkpoint.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(checkpoint.std, device=self.device).view(1, 3, 1, 1)
        self.input_size = tuple(checkpoint.input_size)
        self.settings = MetricSettings(
            grid=config.get("grid", 56), topk=config.get("topk", 0.2), delta=config.get("delta", 0.5)
        )
        self.evidence = evidence_kinds(config.get("evidence", "all"))
        self.schema = schema
        self.mode = mode
        self.with_boxes = all(c in schema.names for c in ("loc_consensus", *BOX_COLUMNS))
        self.batches = 0
        self.kill_after = kill_after
        self.delay = delay

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        self.batches += 1
        self._maybe_die()
        if self.delay:
            time.sleep(self.delay)
        rows = _Rows(self.schema)
        n = len(batch["image_id"])
        images, masks, failed = decode_rows(batch, self.input_size, self.device)
        stage = [batch["decode_stage"][i] or ("decode" if failed[i] else "") for i in range(n)]
        reason = [batch["decode_error"][i] or failed[i] for i in range(n)]
        ok = np.array([not s for s in stage], dtype=bool)
        has_mask = np.array([source != "none" for source in batch["mask_source"]], dtype=bool)
        decoded = Decoded(images, masks, has_mask)
        results = self._explain(batch, decoded, np.flatnonzero(ok))
        for i in range(n):
            for kind in batch["kinds"][i].split(","):
                row = _base_row(batch, i, kind)
                if not ok[i]:
                    rows.add({**row, "status": "error", "error_stage": stage[i], "error": reason[i]})
                elif isinstance(results.get(i), str):
                    rows.add({**row, "status": "error", "error_stage": "model", "error": results[i]})
                else:
                    rows.add({**row, **results[i][kind]})
        return rows.table()

    def _explain(self, batch: dict[str, np.ndarray], decoded: Decoded, indices: np.ndarray) -> dict[int, dict | str]:
        """Per decoded row: {kind: columns} on success, or the model error's text."""
        if len(indices) == 0:
            return {}
        try:
            return self._explain_indices(batch, decoded, indices)
        except Exception as exc:  # noqa: BLE001 - isolate the failing row; the rest of the batch survives
            if len(indices) == 1:
                return {int(indices[0]): one_line(exc)}
            results: dict[int, dict | str] = {}
            for index in indices:
                results.update(self._explain(batch, decoded, np.array([index])))
            return results

    def _explain_indices(self, batch: dict[str, np.ndarray], decoded: Decoded, indices: np.ndarray) -> dict[int, dict]:
        images = model_input(decoded.images[torch.from_numpy(indices).to(self.device)], self.mean, self.std)
        kinds = sorted({kind for i in indices for kind in batch["kinds"][i].split(",")})
        labels = torch.as_tensor(batch["label"][indices].astype(np.int64), device=self.device)
        if self.mode == "forward":
            return self._predictions(images, indices, kinds, labels)
        sets = [None if kind == "pred" else labels for kind in kinds]
        explained = dict(zip(kinds, self.engine.explain_many(images, sets)))
        has_mask = torch.from_numpy(decoded.has_mask[indices]).to(self.device)
        masks = torch.from_numpy(decoded.masks[indices]).to(self.device) if has_mask.any() else None
        boxes = self._boxes(batch, indices) if self.with_boxes else None
        evidence = gather_evidence(self.engine, images, list(explained.values()), self.evidence, masks, has_mask)
        out: dict[int, dict] = {int(i): {} for i in indices}
        for (kind, explanation), found in zip(explained.items(), evidence):
            scores = score_batch(explanation.maps, explanation.empty, masks, boxes, self.settings).columns()
            scores.update(found.columns())
            for position, columns in enumerate(_columns(explanation, scores)):
                index = int(indices[position])
                columns["mask_source"] = batch["mask_source"][index]
                if "occlusion" in self.evidence and not decoded.has_mask[index]:
                    columns["notes"] = "; ".join(filter(None, [columns["notes"], NO_MASK_NOTE]))
                out[index][kind] = columns
        return out

    def _predictions(self, images, indices, kinds, labels) -> dict[int, dict]:
        probs = self.engine.predict(images)
        prob, pred = probs.max(dim=1)
        out: dict[int, dict] = {}
        for position, index in enumerate(indices):
            out[int(index)] = {}
            for kind in kinds:
                target = int(pred[position] if kind == "pred" else labels[position])
                out[int(index)][kind] = {
                    "status": "ok",
                    "pred": int(pred[position]),
                    "prob": float(prob[position]),
                    "target": target,
                    "target_prob": float(probs[position, target]),
                }
        return out

    def _boxes(self, batch, indices) -> torch.Tensor:
        values = np.array(
            [[np.nan if v is None else v for v in batch[c][indices]] for c in BOX_COLUMNS], dtype=np.float32
        ).T
        return torch.from_numpy(values).to(self.device)

    def _maybe_die(self) -> None:
        if not self.kill_after:
            return
        after, marker = self.kill_after.split(":", 1)
        if self.batches == int(after) and not Path(marker).exists():
            Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


def model_input(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> float normalised, on ``mean``'s device (channels-last on a GPU)."""
    device = mean.device
    images = (images.to(device, non_blocking=True).float().div_(255) - mean) / std
    return images.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else images


def load_actor_model(
    checkpoint_ref: list, threads: int | None, device: str | None = None
) -> tuple[Checkpoint, torch.nn.Module, torch.device]:
    """The run's model on ``device``; None: this worker's GPU when Ray gave it one, else the CPU."""
    import ray

    if threads:
        torch.set_num_threads(threads)
    checkpoint: Checkpoint = checkpoint_from_bytes(ray.get(checkpoint_ref[0]))
    if device is None:
        device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
    model = load_model(checkpoint).to(device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return checkpoint, model, torch.device(device)


def explain_engine(model: torch.nn.Module, checkpoint: Checkpoint, config: dict) -> ExplainEngine:
    """The run's engine for ``model``: the run's target layer and options, in the run's precision
    (``fp32``, or ``bf16`` autocast; ``auto``, outside a run: bf16 on a GPU)."""
    on_gpu = next(model.parameters()).device.type == "cuda"
    precision = config.get("precision", "auto")
    bf16 = precision == "bf16" or (precision == "auto" and on_gpu)
    return ExplainEngine(
        model,
        checkpoint.input_size,
        target_layer=config.get("target_layer"),
        classifier=config.get("classifier"),
        gradcampp_eps=config.get("gradcampp_eps", 0.0),
        autocast_dtype=torch.bfloat16 if bf16 else None,
    )


def sanity_task(checkpoint_ref: list, config: dict, rows: dict[str, np.ndarray], threads: int | None = None) -> dict:
    """The run's sanity check (:mod:`audit.explain.sanity`) on the sampled ``rows``, as ``sanity.json`` holds it.

    The rows are decoded here as the job decodes them; rows that fail to decode are left out."""
    checkpoint, model, device = load_actor_model(checkpoint_ref, threads)
    read = read_batch(rows, checkpoint.input_size, "none")
    images, _, failed = decode_rows(read, checkpoint.input_size, device)
    usable = np.array([not (stage or reason) for stage, reason in zip(read["decode_stage"], failed)], dtype=bool)
    if not usable.any():
        return {"error": "no sampled image could be decoded"}
    mean = torch.tensor(checkpoint.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(checkpoint.std, device=device).view(1, 3, 1, 1)
    check = SanityCheck(explain_engine(model, checkpoint, config), chunk=config.get("batch_size") or 32)
    result = check(model_input(images[torch.from_numpy(usable).to(device)], mean, std)).to_dict()
    result["image_ids"] = [str(i) for i in np.asarray(rows["image_id"])[usable]]
    result["device"] = device.type
    return result


def _columns(explanation: Explanation, scores: dict[str, list]) -> list[dict]:
    """Per image of one explained batch: the output columns computed on the device."""
    n = explanation.logits.shape[0]
    prob, pred = explanation.probs.max(dim=1)
    target_prob = explanation.probs.gather(1, explanation.targets[:, None])[:, 0]
    maps = {m: explanation.maps[m] for m in METHODS}
    h, w = next(m for m in maps.values() if m is not None).shape[-2:]
    flat = {m: (v.flatten(1).half().cpu().numpy() if v is not None else None) for m, v in maps.items()}
    empty = {m: (e.cpu().numpy() if e is not None else None) for m, e in explanation.empty.items()}
    pred_, prob_, target_, tprob_ = (t.cpu().numpy() for t in (pred, prob, explanation.targets, target_prob))
    rows = []
    for i in range(n):
        notes = [f"{m}: {reason}" for m, reason in explanation.notes.items()]
        notes += [f"{m}: empty map" for m in METHODS if empty[m] is not None and empty[m][i]]
        row = {
            "status": "ok",
            "pred": int(pred_[i]),
            "prob": float(prob_[i]),
            "target": int(target_[i]),
            "target_prob": float(tprob_[i]),
            "map_h": int(h),
            "map_w": int(w),
            "notes": "; ".join(notes) or None,
            **{f"map_{m}": (flat[m][i] if flat[m] is not None else None) for m in METHODS},
            **{name: values[i] for name, values in scores.items()},
        }
        rows.append(row)
    return rows


def _base_row(batch: dict[str, np.ndarray], i: int, kind: str) -> dict:
    row = {key: _plain(value[i]) for key, value in batch.items() if key not in PASS_THROUGH_SKIP}
    row["target_kind"] = kind
    if kind == "label":
        row["target"] = int(batch["label"][i])
    return row


class _Rows:
    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self.columns: dict[str, list] = {name: [] for name in schema.names}

    def add(self, row: dict) -> None:
        if row.get("status") == "ok" and row.get("pred") is not None:
            row["correct"] = row["pred"] == row["label"]
        for name, values in self.columns.items():
            values.append(row.get(name))

    def table(self) -> pa.Table:
        return to_table(self.columns, self.schema)


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc) if str(exc).strip() else ''}"[:500]
