"""`audit run`: manifest -> read tasks -> explain actors (decode on the device) -> Parquet, resumable, nothing lost.

Exactly once, by construction rather than by trust in the executor:

* every manifest row x target kind is one *key* ``(image_id, target_kind)``; rows the loader
  rejected are written as error rows (stage ``manifest``) before anything runs;
* before each pass the driver lists what is done: it deletes temporary files a killed driver
  left behind and output files that cannot be read, and drops keys that another file already
  holds; what is left to do is the job's input, one block per batch;
* the job streams the pending rows through Ray Data (on a CPU run on the local Ray instance,
  the driver explains each pass's first batch itself while the actors start:
  :mod:`audit.pipeline.head_start`); a killed worker is restarted and its task retried by Ray
  Data. The driver writes each explained batch as it arrives, atomically (a temporary file
  renamed) and named by a hash of its keys, so a batch delivered twice lands once, and
  finished batches are on disk however the run ends. (Ray Data's ``write_parquet``
  was the first design: its write tasks queued behind the read tasks on small machines and
  wrote at the end, and a local path written from worker nodes needs a shared filesystem.
  Explanation rows are small, a few hundred bytes, so the driver is no bottleneck.);
* the driver repeats until no key is pending (a resumed run is just another pass), then counts:
  rows must equal manifest rows x target kinds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from audit import history
from audit.config import COMPUTED, RunConfig
from audit.data import load_dataset
from audit.data.manifest import BOX_COLUMNS, Dataset, with_missing_masks_as_none
from audit.data.storage import StorageError, file_sizes, is_uri
from audit.errors import AuditError
from audit.explain.sanity import SANITY_FILE
from audit.models.anatomy import inspect_model
from audit.models.checkpoint import Checkpoint
from audit.models.source import ResolvedModel, check_request, module_root, resolve_model
from audit.pipeline.cluster import ResourcePlan, check_reachable, plan_resources, ray_cluster
from audit.pipeline.head_start import HeadStart, driver_may_explain, explain_in_driver
from audit.pipeline.read import read_batch
from audit.pipeline.schema import KEY, explanation_schema, to_table
from audit.pipeline.stages import Explainer, one_line
from audit.run_store import publish, publish_missing

RUN_FILE = history.RUN_FILE
MANIFEST_FILE = "manifest.parquet"
OUTPUT_DIR = "explanations"
REJECTED_FILE = "rejected.parquet"
SANITY_SEED = 0
MAX_PASSES = 3
DEVICE_PRECISION = {"cuda": "bf16", "cpu": "fp32"}
DEVICE_BATCH_SIZE = {"cuda": 256, "cpu": 32}


class RunError(AuditError):
    """A run that cannot start or resume."""


@dataclass(frozen=True)
class Execution:
    """How to execute, as opposed to what to compute (the RunConfig).

    ``mode="forward"`` computes predictions only: the baseline of ``audit bench pipeline``.
    ``kill_worker_after`` and ``batch_delay`` are the fault-injection hooks of the tests (see
    :class:`Explainer`).
    """

    progress: bool = True
    mode: str = "explain"
    kill_worker_after: str | None = None
    batch_delay: float = 0.0
    heartbeat_s: float = history.LEASE_INTERVAL_S


@dataclass
class RunState:
    run_dir: Path
    config: RunConfig
    checkpoint_bytes: bytes  # read once: what the actors load is what run.json's sha256 names
    checkpoint: Checkpoint
    schema: pa.Schema
    manifest: pd.DataFrame
    info: dict
    lock: threading.Lock = field(default_factory=threading.Lock)  # the heartbeat writes run.json too

    def save(self) -> None:
        with self.lock:
            _write_info(self.run_dir, self.info)

    def record(self, target: dict, **values) -> None:
        """Set ``values`` in ``target`` (run.json's info or one of its attempts) and save, under the
        lock: the heartbeat thread serialises the same dicts."""
        with self.lock:
            target.update(values)
            _write_info(self.run_dir, self.info)


def run_audit(config: RunConfig, execution: Execution = Execution()) -> Path:
    """Start a new run; return its directory."""
    if config.address not in (None, "auto"):
        check_reachable(config.address)  # before writing anything
    history.check_writable(history.history_folder(config.out, config.audit_name))
    state = _prepare(config.resolved())
    return _execute(state, execution)


def resume_audit(run: Path | str, execution: Execution = Execution(), changes: dict | None = None) -> Path:
    """Finish an interrupted run without recomputing its finished rows. ``run`` is its folder, or
    its URI on object storage: the run is taken over there (a new lease in its run.json, so no
    ``--keep`` deletes it) before it is fetched.

    ``changes`` may set the options that change no computed row (``batch_size``, ``fail_on``...)."""
    if is_uri(run):
        run_dir = history.take_over(str(run), history.new_lease())
        info = read_info(run_dir)
        try:
            state = _resumed_state(run_dir, info, changes)
        except AuditError:  # refused before any work: hand the run back as it was taken
            _write_info(run_dir, {**info, "status": "interrupted", "lease": {}})
            raise
    else:
        run_dir = Path(run).resolve()
        info = read_info(run_dir)
        if history.liveness(info, run_dir) == "live":
            raise RunError(history.still_running(info, run_dir.name))
        state = _resumed_state(run_dir, info, changes)
    return _execute(state, execution)


def _resumed_state(run_dir: Path, info: dict, changes: dict | None) -> RunState:
    config = read_config(run_dir, info)
    if changes:
        thresholds = {**config.thresholds, **changes.get("thresholds", {})}
        wanted = config.updated(**{**changes, "thresholds": thresholds}).resolved()
        fixed = [k for k in (*COMPUTED, "out", "name") if getattr(wanted, k) != getattr(config, k)]
        if fixed:
            raise RunError(f"--resume finishes a run as it started; it cannot change {', '.join(fixed)}")
        config = wanted
        info["config"] = config.to_dict()
    model = resolve_run_model(config, info)
    manifest = with_missing_masks_as_none(pd.read_parquet(run_dir / MANIFEST_FILE))
    schema = pq.read_schema(run_dir / "schema.parquet")
    return RunState(run_dir, config, model.data, model.checkpoint, schema, manifest, info)


def resolve_run_model(config: RunConfig, info: dict) -> ResolvedModel:
    """The model of a run, resolved again: the same spec and options, the classes it resolved;
    an error when its weights changed since the run started (run.json's sha256)."""
    model = resolve_model(config.model_request(), info["model"].get("classes"))
    if model.sha256 != info["model"].get("sha256"):
        raise RunError(f"{config.model} changed since run {info['run_id']} started; start a new run instead")
    return model


def _prepare(config: RunConfig) -> RunState:
    request = config.model_request()
    if request.kind == "checkpoint" or request.classes:
        model = resolve_model(request)
        dataset = load_dataset(config.dataset, config.data_dir, classes=model.checkpoint.classes)
    else:  # the model's outputs are the dataset's classes, in order
        check_request(request)  # a bad spec fails before the dataset is read
        dataset = load_dataset(config.dataset, config.data_dir)
        model = resolve_model(request, dataset.classes)
    checkpoint, model_sha = model.checkpoint, model.sha256
    manifest, rejected = _against_model(dataset, checkpoint)
    if config.limit is not None:
        cutoff = manifest["source_row"].iloc[min(config.limit, len(manifest)) - 1] if len(manifest) else -1
        manifest = manifest.head(config.limit)
        rejected = rejected[rejected["row"] <= cutoff]
    if manifest.empty:
        raise RunError(f"no image of dataset {config.dataset} can be explained by this model")
    fingerprint = _fingerprint(manifest, rejected)
    anatomy = inspect_model(model.model, checkpoint.input_size, config.target_layer, config.classifier)
    started = datetime.now(timezone.utc)
    digest = hashlib.sha256(json.dumps([config.computed, model_sha, fingerprint]).encode()).hexdigest()[:8]
    run_dir = history.create_run_dir(
        history.history_folder(config.out, config.audit_name), history.run_id(started, digest)
    )
    (run_dir / OUTPUT_DIR).mkdir()

    manifest = manifest.assign(kinds=[list(config.target_kinds)] * len(manifest))
    manifest.to_parquet(run_dir / MANIFEST_FILE, index=False)
    with_boxes = all(c in manifest.columns for c in BOX_COLUMNS)
    schema = explanation_schema(pa.Schema.from_pandas(manifest, preserve_index=False), with_boxes)
    pq.write_table(schema.empty_table(), run_dir / "schema.parquet")
    _write_atomic(_rejected_rows(rejected, config.target_kinds, schema), run_dir / OUTPUT_DIR / REJECTED_FILE)
    publish(run_dir, MANIFEST_FILE, "schema.parquet", f"{OUTPUT_DIR}/{REJECTED_FILE}")
    info = {
        "run_id": run_dir.name,
        "audit": config.audit_name,
        "status": "running",
        "started": started.isoformat(),
        "config": config.to_dict(),
        "versions": _versions(),
        "model": {
            **model.info(),
            "parameters": sum(p.numel() for p in model.model.parameters()),
            "target_layer": anatomy.target_layer,
            "layout": anatomy.layout.kind,
            "prefix_tokens": anatomy.layout.prefix_tokens,
            "feature_shape": list(anatomy.feature_shape),
            "cam_head": anatomy.cam_head.name if anatomy.cam_head else None,
            "cam_note": anatomy.cam_note,
            "gradcam_proportional_to_cam": anatomy.gradcam_proportional_to_cam,
            "finer_layer": list(anatomy.finer_layer) if anatomy.finer_layer else None,
        },
        "dataset": {
            "name": dataset.name,
            "root": str(dataset.root),
            "fingerprint": fingerprint,
            "classes": list(dataset.classes),
            "images": int(len(manifest)),
            "rejected": int(len(rejected)),
            "warnings": dataset.warnings,
        },
        "attempts": [],
        "lease": history.new_lease(),  # a run being prepared is a live one
    }
    _write_info(run_dir, info)
    return RunState(run_dir, config, model.data, checkpoint, schema, manifest, info)


def _execute(state: RunState, execution: Execution) -> Path:
    import ray

    attempt = {"started": _now(), "computed_rows": 0, "passes": 0, "driver_rows": 0}
    state.info["attempts"].append(attempt)
    state.info["status"] = "running"
    state.info["lease"] = history.new_lease()
    state.save()
    began = time.perf_counter()
    try:
        with _Heartbeat(state, execution.heartbeat_s), ray_cluster(state.config.address, model_code_env(state.config)):
            ready = time.perf_counter()
            plan = plan_resources(state.config.actors, state.config.node_resource)
            settle_execution(state, plan)
            state.record(
                attempt,
                ray_ready_s=round(ready - began, 3),
                resources=plan.to_dict(),
                batch_size=state.info["execution"]["batch_size"],
            )
            checkpoint_ref = ray.put(state.checkpoint_bytes)
            head_start = driver_may_explain(plan.gpus_per_actor, plan.resources)
            for _ in range(MAX_PASSES):
                pending = _pending(state)
                if pending.empty:
                    break
                todo = int(pending["kinds"].map(len).sum())
                state.record(attempt, passes=attempt["passes"] + 1, computed_rows=attempt["computed_rows"] + todo)
                with _Progress(_expected_rows(state), todo, enabled=execution.progress) as reporter:
                    failure = _run_pass(state, pending, plan, checkpoint_ref, execution, reporter, head_start)
                if failure:
                    print(
                        f"warning: the driver's head start failed, its rows go to the actors: {failure}",
                        file=sys.stderr,
                    )
                    head_start = False
                timing = reporter.timing(ready) if attempt["passes"] == 1 else {}
                state.record(attempt, driver_rows=attempt["driver_rows"] + reporter.driver_rows, **timing)
            if (
                execution.mode == "explain"
                and state.config.sanity_images
                and not (state.run_dir / SANITY_FILE).exists()
            ):
                state.record(attempt, sanity_seconds=_run_sanity(state, plan, checkpoint_ref))
    except KeyboardInterrupt:
        _finish(state, attempt, began, "interrupted")
        raise
    except Exception:
        _finish(state, attempt, began, "failed")
        raise
    _finish(state, attempt, began, None)
    return state.run_dir


def settle_execution(state: RunState, plan) -> None:
    """Fit ``auto`` options to the cluster's device: precision (bf16 on a GPU, fp32 on a CPU) is
    settled once, when the run starts, and kept by every resume (it decides the rows); the batch
    size (256 on a GPU, 32 on a CPU) may change between attempts. run.json ``execution``."""
    config = state.config
    device = "cuda" if plan.gpus_per_actor else "cpu"
    settled = history.run_precision(state.info)  # a resumed run's, also from before it was recorded
    precision = settled or (config.precision if config.precision != "auto" else DEVICE_PRECISION[device])
    batch_size = config.batch_size or DEVICE_BATCH_SIZE[device]
    state.record(state.info, execution={"device": device, "precision": precision, "batch_size": batch_size})


def actor_config(state: RunState) -> dict:
    """The options the actors read: the config with its ``auto`` values settled."""
    return {**state.config.to_dict(), **state.info["execution"]}


def _run_pass(
    state: RunState,
    pending: pd.DataFrame,
    plan,
    checkpoint_ref,
    execution: Execution,
    progress: _Progress,
    head_start: bool,
) -> str | None:
    """Explain ``pending`` and write it batch by batch; with a ``head_start``, the driver explains
    the first batch itself (:mod:`audit.pipeline.head_start`). Returns why a head start failed."""
    # One block per batch, all the way down: each batch reaches the driver when it is explained,
    # not when a large block fills. (A Parquet source of small files is read as one block.)
    batch_size = state.info["execution"]["batch_size"]
    batches = _batches(pending, batch_size)
    read_kwargs = {"input_size": state.checkpoint.input_size, "masks": state.config.masks}
    explainer_kwargs = {
        "checkpoint_ref": [checkpoint_ref],
        "config": actor_config(state),
        "schema": state.schema,
        "threads": plan.torch_threads,
        "mode": execution.mode,
        "delay": execution.batch_delay,
    }

    def write(table: pa.Table, by_driver: bool = False) -> None:
        write_batch(table, state.run_dir / OUTPUT_DIR)
        progress.advance(table.num_rows, len(pc.unique(table.column("image_id"))), by_driver)

    actor_kwargs = {**explainer_kwargs, "kill_after": execution.kill_worker_after}
    if not head_start:
        _run_job(batches, batch_size, plan, read_kwargs, actor_kwargs, write)
        return None
    head = batches.pop(0)
    with HeadStart(
        partial(explain_in_driver, head, read_kwargs, explainer_kwargs), partial(write, by_driver=True)
    ) as driver:
        _run_job(batches, batch_size, plan, read_kwargs, actor_kwargs, write)
    return driver.error


def _run_job(
    batches: list[pd.DataFrame],
    batch_size: int,
    plan: ResourcePlan,
    read_kwargs: dict,
    actor_kwargs: dict,
    write: Callable[[pa.Table], None],
) -> None:
    """The Ray Data job: read tasks, then the explain actors; ``write`` takes each explained batch as it arrives."""
    if not batches:
        return
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    dataset = ray.data.from_pandas(batches)
    read = dataset.map_batches(
        read_batch,
        fn_kwargs=read_kwargs,
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=plan.read_cpus,
        resources=plan.resources or None,
    )
    explained = read.map_batches(
        Explainer,
        fn_constructor_kwargs=actor_kwargs,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=plan.actors),
        num_cpus=plan.cpus_per_actor,
        num_gpus=plan.gpus_per_actor or None,
        resources=plan.resources or None,
    )
    # prefetch_batches=0: a batch is written as soon as it is explained, not when the next one is
    for table in explained.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        if table.num_rows:
            write(table)


def model_code_env(config: RunConfig) -> dict | None:
    """The job's runtime_env that ships the team's model code (a ``package.module:callable``
    spec) to every worker: the package's folder (or the module's file) as a ``py_modules`` entry,
    so workers need not have it on their path. Ray uploads local code at the job level only, so it
    applies where the run connects to Ray itself (a driver already connected keeps its own)."""
    root = module_root(config.model)
    return {"py_modules": [root]} if root else None


def sanity_sample(manifest: pd.DataFrame, size: int) -> pd.DataFrame:
    """The images the sanity check explains: ``size`` manifest rows drawn with a fixed seed, in manifest order."""
    if len(manifest) <= size:
        return manifest
    chosen = np.random.default_rng(SANITY_SEED).choice(len(manifest), size=size, replace=False)
    return manifest.iloc[np.sort(chosen)]


def _run_sanity(state: RunState, plan, checkpoint_ref) -> float:
    """Run the sanity check as one Ray task with an explain actor's resources; write ``sanity.json``."""
    import ray

    from audit.pipeline.stages import sanity_task

    began = time.perf_counter()
    sample = sanity_sample(state.manifest, state.config.sanity_images)
    rows = {column: sample[column].to_numpy() for column in ("image_id", "path", "mask_path")}
    task = ray.remote(sanity_task).options(
        num_cpus=plan.cpus_per_actor,
        num_gpus=plan.gpus_per_actor or None,
        resources=plan.resources or None,
        max_retries=1,
    )
    try:
        result = ray.get(task.remote([checkpoint_ref], actor_config(state), rows, plan.torch_threads))
    except Exception as exc:  # noqa: BLE001 - the run's rows stand; the report says the check did not run
        result = {"error": one_line(exc)}
    partial = state.run_dir / f".{SANITY_FILE}.tmp"
    partial.write_text(json.dumps(result, indent=2), encoding="utf-8")
    partial.replace(state.run_dir / SANITY_FILE)
    publish(state.run_dir, SANITY_FILE)
    return round(time.perf_counter() - began, 3)


def write_batch(table: pa.Table, folder: Path) -> Path:
    """Write one explained batch atomically, named by its keys: a batch delivered twice lands once."""
    keys = sorted(zip(table.column("image_id").to_pylist(), table.column("target_kind").to_pylist()))
    name = hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:20]
    path = folder / f"part-{name}.parquet"
    _write_atomic(table, path)
    publish(folder.parent, f"{folder.name}/{path.name}")
    return path


def _batches(pending: pd.DataFrame, batch_size: int) -> list[pd.DataFrame]:
    pending = pending.assign(kinds=pending["kinds"].map(",".join))  # a plain string survives Arrow as is
    return [pending.iloc[start : start + batch_size] for start in range(0, len(pending), batch_size)]


def _pending(state: RunState) -> pd.DataFrame:
    """Manifest rows with the target kinds not yet in a readable output file."""
    done = done_keys(state.run_dir)
    expected = state.manifest[["image_id", "kinds"]].explode("kinds").rename(columns={"kinds": "target_kind"})
    todo = expected.merge(done.assign(_done=True), on=list(KEY), how="left")
    todo = todo[todo["_done"].isna()]
    kinds = todo.groupby("image_id", sort=False)["target_kind"].agg(list)
    pending = state.manifest[state.manifest["image_id"].isin(kinds.index)].copy()
    pending["kinds"] = pending["image_id"].map(kinds)
    return pending


def done_keys(run_dir: Path) -> pd.DataFrame:
    """Keys held by the output files, after removing unreadable files and duplicate rows."""
    seen: set[tuple[str, str]] = set()
    frames = []
    for unfinished in (run_dir / OUTPUT_DIR).glob(".*.tmp"):
        unfinished.unlink()  # a write the driver did not live to rename
    for file in sorted((run_dir / OUTPUT_DIR).glob("*.parquet")):
        if file.name == REJECTED_FILE:
            continue
        try:
            keys = pq.read_table(file, columns=list(KEY)).to_pandas()
        except (pa.ArrowInvalid, OSError):
            file.unlink()  # damaged (or cut off by a writer other than ours): its rows are recomputed
            publish(run_dir, f"{OUTPUT_DIR}/{file.name}")
            continue
        tuples = list(zip(keys["image_id"], keys["target_kind"]))
        duplicated = [key in seen for key in tuples]
        if any(duplicated):
            _drop_rows(file, duplicated)
            keys = keys[[not d for d in duplicated]]
            tuples = [t for t, d in zip(tuples, duplicated) if not d]
        seen.update(tuples)
        frames.append(keys)
    return pd.concat(frames) if frames else pd.DataFrame(columns=list(KEY))


def _drop_rows(file: Path, drop: list[bool]) -> None:
    table = pq.read_table(file)
    kept = table.filter(pa.array([not d for d in drop]))
    if kept.num_rows:
        _write_atomic(kept, file)
    else:
        file.unlink()
    publish(file.parent.parent, f"{OUTPUT_DIR}/{file.name}")


def _finish(state: RunState, attempt: dict, began: float, status: str | None) -> None:
    attempt["seconds"] = round(time.perf_counter() - began, 3)
    attempt["finished"] = _now()
    counts = count_rows(state.run_dir)
    expected = _expected_rows(state)
    state.info["counts"] = {**counts, "expected_rows": expected}
    if status is None:
        status = "complete" if counts["rows"] == expected else "incomplete"
    state.info["status"] = status
    seconds = sum(a.get("seconds", 0) for a in state.info["attempts"])
    state.info["timings"] = {
        "seconds": round(seconds, 3),
        "rows_per_second": round(counts["rows"] / seconds, 3) if seconds else None,
    }
    try:
        state.save()
        publish_missing(state.run_dir)  # a run on object storage: whatever an upload missed
    except StorageError as exc:
        if status in ("interrupted", "failed"):
            print(f"warning: {exc}", file=sys.stderr)  # the error that stopped the run is the one to tell
            return
        raise RunError(
            f"run {history.location(state.run_dir)} ended, but the store did not take all of it: {exc}; "
            "resume it with --resume"
        ) from exc
    if status == "complete":
        try:
            history.mark_latest(state.run_dir)
        except history.HistoryError as exc:  # on a store readers find the newest complete run anyway
            print(f"warning: latest not moved: {exc}", file=sys.stderr)
    if status == "incomplete":
        raise RunError(
            f"run {history.location(state.run_dir)} holds {counts['rows']} rows, expected {expected}; "
            "resume it with --resume"
        )


def _expected_rows(state: RunState) -> int:
    return (len(state.manifest) + state.info["dataset"]["rejected"]) * len(state.config.target_kinds)


def count_rows(run_dir: Path) -> dict:
    """Rows, ok rows and error rows by stage, from the output files."""
    files = sorted((run_dir / OUTPUT_DIR).glob("*.parquet"))
    if not files:
        return {"rows": 0, "ok": 0, "errors": 0, "errors_by_stage": {}}
    table = pa.concat_tables([pq.read_table(f, columns=["status", "error_stage"]) for f in files])
    frame = table.to_pandas()
    errors = frame[frame["status"] == "error"]
    return {
        "rows": int(len(frame)),
        "ok": int((frame["status"] == "ok").sum()),
        "errors": int(len(errors)),
        "errors_by_stage": {str(k): int(v) for k, v in errors["error_stage"].value_counts().items()},
    }


def _against_model(dataset: Dataset, checkpoint: Checkpoint) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Labels re-indexed to the model's classes; rows of classes the model lacks are rejected."""
    classes = list(checkpoint.classes)
    manifest = dataset.manifest
    if set(dataset.classes) - set(classes) and all(c.isdigit() for c in dataset.classes):
        names = {str(i): name for i, name in enumerate(classes)}  # bare indices name the model's classes
        manifest = manifest.assign(label_name=manifest["label_name"].map(lambda n: names.get(n, n)))
    known = manifest["label_name"].isin(classes)
    unknown = manifest[~known]
    rejected = pd.concat(
        [
            dataset.rejected,
            pd.DataFrame(
                {
                    "row": unknown["source_row"],
                    "image_id": unknown["image_id"],
                    "path": unknown["path"],
                    "label_name": unknown["label_name"],
                    "reason": [f"label {n!r} is not one of the model's classes" for n in unknown["label_name"]],
                }
            ),
        ],
        ignore_index=True,
    )
    manifest = manifest[known].assign(label=lambda f: f["label_name"].map(classes.index).astype("int64"))
    return manifest.reset_index(drop=True), rejected


def _rejected_rows(rejected: pd.DataFrame, kinds: tuple[str, ...], schema: pa.Schema) -> pa.Table:
    columns: dict[str, list] = {name: [] for name in schema.names}
    for record in rejected.to_dict("records"):
        for kind in kinds:
            row = {
                "image_id": record["image_id"],
                "label_name": record["label_name"],
                "path": record["path"],
                "target_kind": kind,
                "status": "error",
                "error_stage": "manifest",
                "error": record["reason"],
                "source_row": record["row"],
            }
            for name, values in columns.items():
                values.append(row.get(name))
    return to_table(columns, schema)


def _fingerprint(manifest: pd.DataFrame, rejected: pd.DataFrame) -> str:
    digest = hashlib.sha256()
    sizes = file_sizes(manifest["path"].tolist())
    for image_id, label_name, path in manifest[["image_id", "label_name", "path"]].itertuples(index=False):
        digest.update(f"{image_id}\t{label_name}\t{sizes.get(path, -1)}\n".encode())
    digest.update(f"rejected:{len(rejected)}".encode())
    return digest.hexdigest()


def _versions() -> dict:
    names = ("cam-audit", "torch", "torchvision", "ray", "pyarrow", "pandas", "numpy")
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _write_atomic(table: pa.Table, path: Path) -> None:
    partial = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, partial)
    partial.replace(path)


def read_info(run_dir: Path) -> dict:
    """run.json, checked (:func:`audit.history.read_run_info`)."""
    return history.read_run_info(run_dir)


def read_config(run_dir: Path, info: dict) -> RunConfig:
    """The configuration a run was started with; one that does not validate is a damaged run file."""
    try:
        return RunConfig.from_dict(info["config"])
    except AuditError as exc:
        raise RunError(f"{history.location(run_dir)}/{RUN_FILE} is not a cam-audit run file: {exc}") from None


def _write_info(run_dir: Path, info: dict) -> None:
    partial = run_dir / f".{RUN_FILE}.tmp"
    partial.write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
    partial.replace(run_dir / RUN_FILE)
    publish(run_dir, RUN_FILE)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class _Heartbeat:
    """Refreshes the run's lease in run.json every ``interval`` seconds while the driver works, so
    that a driver killed hard leaves a heartbeat that goes stale (:func:`audit.history.liveness`)."""

    def __init__(self, state: RunState, interval: float) -> None:
        self.state, self.interval = state, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="cam-audit-heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            with self.state.lock:
                self.state.info["lease"]["heartbeat"] = _now()
                try:
                    _write_info(self.state.run_dir, self.state.info)
                except StorageError:
                    pass  # a store that did not answer this time: the next beat publishes again


class _Progress:
    """One line on stderr every few seconds: rows done of all, rate, time left. Batches may come
    from two threads (the job's and the driver's head start)."""

    def __init__(self, total: int, todo: int, enabled: bool, every: float = 5.0) -> None:
        self.total, self.done, self.enabled, self.every = total, total - todo, enabled, every
        self.new = self.images = self.driver_rows = 0
        self.first_batch = None
        self.job_batches: list[tuple[float, int]] = []  # (written at, images) of the job's batches
        self.lock = threading.Lock()

    def __enter__(self) -> _Progress:
        self.began = self.last = time.perf_counter()
        return self

    def advance(self, rows: int, images: int, by_driver: bool = False) -> None:
        with self.lock:
            now = time.perf_counter()
            self.new += rows
            self.images += images
            self.first_batch = self.first_batch or now
            if by_driver:
                self.driver_rows += rows
            else:
                self.job_batches.append((now, images))
            if now - self.last >= self.every:
                self._report()

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self._report()

    def timing(self, ready: float) -> dict:
        """Seconds from Ray being up to the first written batch, and the job's rate after its own
        first batch (images/s): the steady state, the actors' start-up left out."""
        if self.first_batch is None:
            return {}
        steady = None
        if len(self.job_batches) > 1:
            (first, _), (last, _) = self.job_batches[0], self.job_batches[-1]
            steady = sum(images for _, images in self.job_batches[1:]) / (last - first) if last > first else None
        return {
            "first_batch_s": round(self.first_batch - ready, 3),
            "steady_images_per_s": round(steady, 3) if steady else None,
            "images": self.images,
        }

    def _report(self) -> None:
        import sys

        self.last = time.perf_counter()
        if not self.enabled:
            return
        done = self.done + self.new
        rate = self.new / max(self.last - self.began, 1e-9)
        left = f", about {(self.total - done) / rate:.0f} s left" if rate > 0 and done < self.total else ""
        print(
            f"progress: {done}/{self.total} rows ({100 * done / max(self.total, 1):.0f}%), {rate:.1f} rows/s{left}",
            file=sys.stderr,
            flush=True,
        )
