"""`audit run` on a local Ray instance: rows conserved, schema, maps, resume, a killed worker.

One small synthetic dataset with bad files planted in it, one random-init resnet18 at 64x64.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import audit.pipeline.run as run_module
from audit import history
from audit.config import RunConfig
from audit.data.ham10000 import CLASSES
from audit.data.storage import StorageError
from audit.data.synthetic import Shortcut, SyntheticSpec, generate
from audit.explain import ExplainEngine
from audit.explain.evidence import FAITHFULNESS_COLUMNS, OCCLUSION_COLUMNS, gather_evidence
from audit.explain.sanity import SANITY_FILE, SANITY_METHODS
from audit.history import runs
from audit.models import load_checkpoint, load_model
from audit.models.checkpoint import save_random_checkpoint
from audit.pipeline.head_start import HeadStart, driver_may_explain
from audit.pipeline.read import read_batch
from audit.pipeline.run import OUTPUT_DIR, Execution, RunError, count_rows, resume_audit, run_audit
from audit.pipeline.schema import AGREEMENT_COLUMNS, EVIDENCE_COLUMNS, LOCALIZATION_COLUMNS, MAP_COLUMNS
from audit.pipeline.stages import decode_rows

IMAGES = 24
BAD = {
    "ISIC_0000001": "empty file",
    "ISIC_0000002": "not an image",
    "ISIC_0000003": "truncated",
    "ISIC_0000004": "file not found",
    "ISIC_0000005": "aspect ratio",  # its mask
}


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = generate(
        tmp_path_factory.mktemp("pipeline") / "syn",
        SyntheticSpec(images=IMAGES, height=48, width=64, shortcuts={"df": Shortcut("patch")}, seed=5),
        workers=1,
    )
    images = root / "HAM10000_images_part_1"
    (images / "ISIC_0000001.jpg").write_bytes(b"")
    (images / "ISIC_0000002.jpg").write_text("plain text")
    (images / "ISIC_0000003.jpg").write_bytes((images / "ISIC_0000003.jpg").read_bytes()[:300])
    (images / "ISIC_0000004.jpg").unlink()
    Image.new("L", (50, 50)).save(root / "HAM10000_segmentations_lesion_tschandl" / "ISIC_0000005_segmentation.png")
    metadata = root / "HAM10000_metadata.csv"
    lines = metadata.read_text().splitlines()
    extra = [lines[7], lines[8].replace(lines[8].split(",")[2], "unknown_dx", 1)]  # a duplicate id, an unknown label
    metadata.write_text("\n".join(lines + extra) + "\n")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_random_checkpoint(path, "resnet18", CLASSES, (64, 64))
    return path


def _config(dataset_dir, checkpoint, out, **changes):
    settings = {"targets": "both", "batch_size": 4, "sanity_images": 0, **changes}  # the check: `finished` only
    return RunConfig(dataset="synthetic", data_dir=str(dataset_dir), model=str(checkpoint), out=str(out), **settings)


def _assert_each_key_once(rows: pd.DataFrame) -> None:
    """Rejected rows may repeat an id (a duplicate is one of the reasons); every other key is unique."""
    explained = rows[rows["error_stage"].fillna("") != "manifest"]
    assert not explained.duplicated(["image_id", "target_kind"]).any()


def _map_values(stored):
    return None if stored is None else list(stored)


def _rows(run_dir) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(f) for f in sorted((run_dir / OUTPUT_DIR).glob("*.parquet"))], ignore_index=True)


@pytest.fixture(scope="module")
def finished(ray_session, dataset_dir, checkpoint, tmp_path_factory):
    config = _config(dataset_dir, checkpoint, tmp_path_factory.mktemp("runs"), sanity_images=64)
    return run_audit(config, Execution(progress=False))


def test_every_row_ends_once_ok_or_error(finished):
    rows = _rows(finished)
    assert len(rows) == (IMAGES + 2) * 2  # 24 images + a duplicate + an unknown label, two targets each
    _assert_each_key_once(rows)
    assert set(rows["status"]) == {"ok", "error"}
    assert rows.loc[rows["status"] == "ok", "error"].isna().all()
    assert rows.loc[rows["status"] == "error", "error"].notna().all()


def test_bad_inputs_become_error_rows_with_stage_and_reason(finished):
    rows = _rows(finished)
    errors = rows[rows["status"] == "error"]
    for image_id, reason in BAD.items():
        found = errors[errors["image_id"] == image_id]
        assert len(found) == 2, image_id
        assert found["error"].str.contains(reason).all(), (image_id, found["error"].tolist())
        assert set(found["error_stage"]) == {"mask" if reason == "aspect ratio" else "decode"}
    manifest_errors = errors[errors["error_stage"] == "manifest"]
    assert len(manifest_errors) == 4
    assert manifest_errors["error"].str.contains("duplicate image_id|is not one of the classes").all()
    assert len(rows[rows["status"] == "ok"]) == (IMAGES - len(BAD)) * 2


def test_schema_and_maps(finished):
    rows = _rows(finished)
    ok = rows[rows["status"] == "ok"]
    schema = pq.read_schema(next(f for f in (finished / OUTPUT_DIR).glob("*.parquet")))
    assert str(schema.field("map_gradcampp").type) == "list<element: halffloat>"
    for column in (
        *MAP_COLUMNS,
        *AGREEMENT_COLUMNS,
        *LOCALIZATION_COLUMNS,
        *EVIDENCE_COLUMNS,
        "target_kind",
        "pred",
        "prob",
        "target_prob",
        "correct",
        "mask_source",
        "label_name",
        "group",
        "dx_type",
        "age",
        "path",
    ):
        assert column in rows.columns, column
    assert (ok["map_h"] == 2).all() and (ok["map_w"] == 2).all()
    assert ok["map_gradcam"].map(len).eq(4).all()
    assert ok["map_gradcam"].map(lambda m: 0 <= m.min() and m.max() <= 1).all()
    assert (ok["mask_source"] == "provided").all()
    label_rows = ok[ok["target_kind"] == "label"]
    assert (label_rows["target"] == label_rows["label"]).all()
    pred_rows = ok[ok["target_kind"] == "pred"]
    assert (pred_rows["target"] == pred_rows["pred"]).all()
    assert (pred_rows["correct"] == (pred_rows["pred"] == pred_rows["label"])).all()
    assert ok[list(EVIDENCE_COLUMNS)].notna().all().all()  # every ok row has a provided mask here


def test_evidence_equals_the_engines_own(finished, checkpoint):
    """What the actors stored is what the evidence functions give on the same decoded batch."""
    rows = _rows(finished)
    ok = rows[(rows["status"] == "ok") & (rows["target_kind"] == "label")].head(6)
    batch = {key: ok[key].to_numpy() for key in ("image_id", "path", "mask_path")}
    pixels, masks, _ = decode_rows(read_batch(batch, (64, 64), "provided"), (64, 64), "cpu")
    images = (pixels.float() / 255 - 0.5) / 0.25
    engine = ExplainEngine(load_model(load_checkpoint(checkpoint)), (64, 64))
    explanation = engine(images, torch.tensor(ok["label"].to_numpy()))
    masks = torch.from_numpy(masks)
    columns = gather_evidence(engine, images, [explanation], ("occlusion", "faithfulness"), masks)[0].columns()
    for name in (*OCCLUSION_COLUMNS, *FAITHFULNESS_COLUMNS):
        stored = ok[name].to_numpy()
        if name.endswith("_pred") or name.startswith("increase_"):
            assert stored.tolist() == columns[name], name
        else:
            assert np.allclose(stored.astype(float), columns[name], atol=1e-4), name


def test_maps_equal_the_engines_own_output(finished, checkpoint):
    rows = _rows(finished)
    ok = rows[(rows["status"] == "ok") & (rows["target_kind"] == "label")].head(6)
    batch = {
        "image_id": ok["image_id"].to_numpy(),
        "path": ok["path"].to_numpy(),
        "mask_path": ok["mask_path"].to_numpy(),
    }
    pixels = decode_rows(read_batch(batch, (64, 64), "none"), (64, 64), "cpu")[0]
    images = (pixels.float() / 255 - 0.5) / 0.25
    engine = ExplainEngine(load_model(load_checkpoint(checkpoint)), (64, 64))
    result = engine(images, torch.tensor(ok["label"].to_numpy()))
    for name in ("cam", "gradcam", "gradcampp"):
        stored = np.stack(ok[f"map_{name}"].to_numpy()).astype(np.float32)
        assert np.allclose(stored, result.maps[name].flatten(1).numpy(), atol=1e-3), name


def test_run_json(finished):
    info = json.loads((finished / "run.json").read_text())
    assert info["status"] == "complete"
    assert info["counts"]["rows"] == info["counts"]["expected_rows"] == 52
    assert info["counts"]["errors_by_stage"] == {"decode": 8, "manifest": 4, "mask": 2}
    assert info["model"]["target_layer"] == "layer4" and info["model"]["gradcam_proportional_to_cam"] is True
    assert len(info["model"]["sha256"]) == 64 and len(info["dataset"]["fingerprint"]) == 64
    assert info["versions"]["torch"] and info["versions"]["ray"]
    assert info["attempts"][0]["computed_rows"] == 48 and info["timings"]["seconds"] > 0
    assert info["attempts"][0]["driver_rows"] == 8  # the driver's head start: the first batch of 4 images
    assert info["execution"] == {"device": "cpu", "precision": "fp32", "batch_size": 4}
    first = info["attempts"][0]
    assert 0 < first["first_batch_s"] < first["seconds"] and first["steady_images_per_s"] > 0
    assert first["images"] == IMAGES  # every image of the manifest, the unreadable ones as error rows
    assert info["attempts"][0]["sanity_seconds"] > 0
    assert info["lease"]["pid"] == os.getpid() and info["lease"]["host"] == socket.gethostname()
    assert history.liveness(info, finished) == "finished"


def test_a_running_driver_keeps_its_lease_fresh_and_cannot_be_resumed_under_it(
    ray_session, dataset_dir, checkpoint, tmp_path
):
    config = _config(dataset_dir, checkpoint, tmp_path, targets="pred", batch_size=2, limit=8, evidence="none")
    worker = threading.Thread(
        target=run_audit, args=(config, Execution(progress=False, heartbeat_s=0.2, batch_delay=0.5)), daemon=True
    )
    worker.start()
    heartbeats, run_dir, deadline = set(), None, time.monotonic() + 120
    while worker.is_alive() and len(heartbeats) < 3 and time.monotonic() < deadline:
        found = list(tmp_path.glob("*/*/run.json"))
        if found:
            run_dir = found[0].parent
            info = history.read_run_info(run_dir)
            if info["status"] == "running":
                heartbeats.add(info["lease"]["heartbeat"])
                assert history.liveness(info, run_dir) == "live"
        time.sleep(0.1)
    assert len(heartbeats) >= 3, "the heartbeat did not move while the run worked"
    with pytest.raises(RunError, match="is still running"):
        resume_audit(run_dir, Execution(progress=False))
    worker.join(timeout=300)
    assert history.read_run_info(run_dir)["status"] == "complete"


def test_the_run_checks_its_maps_by_model_randomization(finished):
    sanity = json.loads((finished / SANITY_FILE).read_text())
    decodable = IMAGES - 4  # the sample is the whole manifest here; four images do not decode
    assert sanity["images"] == decodable and len(sanity["image_ids"]) == decodable
    assert sanity["seeds"] == [0, 1, 2] and sanity["device"] == "cpu" and sanity["guided_images"] == 8
    assert sanity["steps"][0]["randomized"] == ["fc"] and sanity["steps"][-1]["randomized"][-1] == "layer3"
    for step in sanity["steps"]:
        assert set(step["similarity"]) == set(SANITY_METHODS)
        assert all(v is None or -1 <= v <= 1 for v in step["similarity"].values())


def test_resume_recomputes_only_what_is_missing(finished, tmp_path):
    run_dir = tmp_path / finished.name
    shutil.copytree(finished, run_dir)
    files = sorted(f for f in (run_dir / OUTPUT_DIR).glob("*.parquet") if f.name != "rejected.parquet")
    lost = pq.read_metadata(files[0]).num_rows + pq.read_metadata(files[1]).num_rows
    files[0].unlink()  # never written
    files[1].write_bytes(files[1].read_bytes()[:100])  # cut off mid-write: no footer
    shutil.copy(files[2], run_dir / OUTPUT_DIR / "copy-of-a-finished-file.parquet")  # a duplicate
    (run_dir / OUTPUT_DIR / ".part-left-by-a-killed-driver.parquet.tmp").write_bytes(b"PAR1")
    resume_audit(run_dir, Execution(progress=False))
    rows = _rows(run_dir)
    assert len(rows) == 52
    _assert_each_key_once(rows)
    assert not list((run_dir / OUTPUT_DIR).glob(".*.tmp"))
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "complete" and info["attempts"][-1]["computed_rows"] == lost


def test_resuming_a_complete_run_computes_nothing(finished, tmp_path):
    run_dir = tmp_path / finished.name
    shutil.copytree(finished, run_dir)
    resume_audit(run_dir, Execution(progress=False))
    attempt = json.loads((run_dir / "run.json").read_text())["attempts"][-1]
    assert attempt["computed_rows"] == 0 and "sanity_seconds" not in attempt  # the check is not run twice


def test_the_driver_may_explain_only_cpu_runs_on_the_ray_instance_it_started(ray_session):
    assert driver_may_explain(0.0, {})  # this test session started its local Ray instance
    assert not driver_may_explain(1.0, {})  # a GPU run: rows in the run's precision on the actors' device
    assert not driver_may_explain(0.0, {"audit_worker": 0.001})  # a run placed on chosen nodes
    # a driver joining a running cluster: test_jobs.py and test_multinode.py check run.json's driver_rows == 0


def test_the_driver_head_start_writes_the_rows_an_actor_writes(
    ray_session, dataset_dir, checkpoint, tmp_path, monkeypatch
):
    """The first batch (with four unreadable images) explained in the driver equals the actors' rows."""
    config = _config(dataset_dir, checkpoint, tmp_path / "head-start", limit=8)
    head_started = run_audit(config, Execution(progress=False))
    attempt = json.loads((head_started / "run.json").read_text())["attempts"][0]
    assert attempt["driver_rows"] == 8 and attempt["computed_rows"] == 16  # one batch of 4 images x 2 targets
    assert attempt["first_batch_s"] > 0 and attempt["steady_images_per_s"] is None  # the actors wrote one batch

    monkeypatch.setattr(run_module, "driver_may_explain", lambda *plan: False)
    actors_only = run_audit(replace(config, out=str(tmp_path / "actors")), Execution(progress=False))
    assert json.loads((actors_only / "run.json").read_text())["attempts"][0]["driver_rows"] == 0
    one, two = (
        _rows(d).sort_values(["image_id", "target_kind"], ignore_index=True) for d in (head_started, actors_only)
    )
    assert set(one.loc[one["status"] == "error", "image_id"]) >= {"ISIC_0000001", "ISIC_0000002", "ISIC_0000003"}
    maps = list(MAP_COLUMNS)
    pd.testing.assert_frame_equal(one.drop(columns=maps), two.drop(columns=maps))
    for column in maps:
        assert one[column].map(_map_values).tolist() == two[column].map(_map_values).tolist(), column


def test_a_failed_head_start_leaves_its_rows_to_the_actors(
    ray_session, dataset_dir, checkpoint, tmp_path, monkeypatch, capsys
):
    def fail(*args):
        raise MemoryError("out of memory in the driver")

    monkeypatch.setattr(run_module, "explain_in_driver", fail)
    config = _config(dataset_dir, checkpoint, tmp_path, limit=8, evidence="none")
    run_dir = run_audit(config, Execution(progress=False))
    warning = "warning: the driver's head start failed, its rows go to the actors: MemoryError: out of memory"
    assert warning in capsys.readouterr().err
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "complete" and info["counts"]["rows"] == 16
    assert info["attempts"][0]["driver_rows"] == 0 and info["attempts"][0]["passes"] == 2
    _assert_each_key_once(_rows(run_dir))


def test_a_head_start_raises_its_failed_write_and_writes_nothing_after_a_stopped_pass():
    table = pa.table({"image_id": ["a"]})

    def refuse(written):
        raise StorageError("cannot write s3://runs/x: access denied")

    with pytest.raises(StorageError, match="access denied"):  # as a failed write on the main thread
        with HeadStart(lambda: table, refuse):
            pass

    release, written = threading.Event(), []
    with pytest.raises(KeyboardInterrupt):
        with HeadStart(lambda: release.wait(10) and table, written.append) as driver:
            raise KeyboardInterrupt  # Ctrl-C: the pass ends without waiting for the driver's batch
    release.set()
    driver.thread.join(10)
    assert written == [] and driver.error is None


def test_a_killed_worker_is_retried_and_every_row_lands_once(ray_session, dataset_dir, checkpoint, tmp_path):
    marker = tmp_path / "killed"
    config = _config(dataset_dir, checkpoint, tmp_path / "runs", evidence="none")  # rows and retries, not evidence
    run_dir = run_audit(config, Execution(progress=False, kill_worker_after=f"2:{marker}"))
    assert marker.exists()  # the worker really died (SIGKILL) in its second batch
    rows = _rows(run_dir)
    assert len(rows) == 52 and count_rows(run_dir)["rows"] == 52
    _assert_each_key_once(rows)


def test_limit_and_pred_only(ray_session, dataset_dir, checkpoint, tmp_path):
    config = _config(
        dataset_dir,
        checkpoint,
        tmp_path,
        targets="pred",
        batch_size=8,
        limit=10,
        masks="estimate",
        evidence="none",
        sanity_images=0,
    )
    run_dir = run_audit(config, Execution(progress=False))
    assert not (run_dir / SANITY_FILE).exists()  # --sanity-images 0 turns the check off
    rows = _rows(run_dir)
    assert len(rows) == 10 and set(rows["target_kind"]) == {"pred"}
    assert set(rows.loc[rows["status"] == "ok", "mask_source"]) == {"estimated"}
    assert rows[list(EVIDENCE_COLUMNS)].isna().all().all()  # --evidence none computes none


def test_resume_refuses_a_changed_checkpoint(finished, tmp_path, checkpoint):
    run_dir = tmp_path / finished.name
    shutil.copytree(finished, run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    info["model"]["sha256"] = "0" * 64
    (run_dir / "run.json").write_text(json.dumps(info))
    with pytest.raises(RunError, match="changed since run"):
        resume_audit(run_dir, Execution(progress=False))


def _run_command(dataset_dir, checkpoint, out, *extra: str) -> list[str]:
    """`audit run` on the test dataset, as a subprocess command line."""
    command = [sys.executable, "-m", "audit.cli", "run", "--dataset", "synthetic", "--data-dir", str(dataset_dir)]
    return [*command, "--checkpoint", str(checkpoint), "--out", str(out), "--sanity-images", "0", *extra]


def test_cli_reports_an_unreachable_cluster_and_missing_options(dataset_dir, checkpoint, tmp_path):
    unreachable = subprocess.run(
        _run_command(dataset_dir, checkpoint, tmp_path, "--address", "127.0.0.1:1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert unreachable.returncode == 2 and "cannot reach the Ray cluster at 127.0.0.1:1" in unreachable.stderr
    assert not list(tmp_path.iterdir())  # nothing written
    base = [sys.executable, "-m", "audit.cli", "run"]
    missing = subprocess.run([*base, "--dataset", "synthetic"], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "needs --model" in missing.stderr


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGKILL"])
def test_interrupted_driver_resumes_without_recomputing(dataset_dir, checkpoint, tmp_path, signal_name):
    """Ctrl-C (or a killed driver) half-way; `audit run --resume` finishes the rest, once each."""
    import os
    import signal
    import time

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # --batch-delay: at least 6 s of work, so the signal lands mid-run
    # --evidence none: the interruption and the resume are tested here, not the evidence
    command = _run_command(
        dataset_dir, checkpoint, tmp_path, "--batch-size", "2", "--batch-delay", "0.5", "--evidence", "none"
    )
    driver = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # a child inherits an ignored SIGINT, and Python then installs no KeyboardInterrupt handler:
        # start the driver as a terminal would, whatever an earlier test left in this process
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 240
    written = []
    while time.monotonic() < deadline and driver.poll() is None:
        written = [f for f in tmp_path.glob(f"*/*/{OUTPUT_DIR}/*.parquet") if f.name != "rejected.parquet"]
        if len(written) >= 2:
            break
        time.sleep(0.2)
    assert driver.poll() is None, f"the run ended before it could be interrupted: {driver.communicate()}"
    if signal_name == "SIGINT":
        driver.send_signal(signal.SIGINT)
    else:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and every process it started
    _, stderr = driver.communicate(timeout=120)
    (run_dir,) = runs(tmp_path / dataset_dir.name)
    info = json.loads((run_dir / "run.json").read_text())
    if signal_name == "SIGINT":
        assert driver.returncode == 130 and "--resume" in stderr
        assert info["status"] == "interrupted"
    else:
        assert info["status"] == "running"  # nobody could record the end...
        assert info["lease"]["pid"] == driver.pid  # ...but the lease says whose it was,
        assert history.liveness(info, run_dir) == "dead"  # and that its driver is gone
        from audit.report import build_report

        notes = build_report(run_dir).summary["notes"]
        assert any(note.startswith("the run died while running") for note in notes)
    before = count_rows(run_dir)["rows"]
    assert 0 < before < 26  # one target: 24 images + 2 rejected rows

    resumed = subprocess.run(
        [sys.executable, "-m", "audit.cli", "run", "--resume", str(run_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip().splitlines()[-1] == str(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())  # the run ends with the report stage
    assert summary["rows"] == 26 and (run_dir / "report.html").stat().st_size > 0
    assert f"report: {run_dir / 'report.html'}" in resumed.stderr
    rows = _rows(run_dir)
    assert len(rows) == 26
    _assert_each_key_once(rows)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "complete"
    assert info["attempts"][-1]["computed_rows"] <= 26 - before  # finished rows were not recomputed


def test_precision_auto_is_settled_by_the_device_once_and_kept_by_a_resume(checkpoint):
    from types import SimpleNamespace

    from audit.pipeline.run import settle_execution
    from audit.pipeline.stages import explain_engine

    def settled(precision, gpus, info=None, batch_size=None):
        config = SimpleNamespace(precision=precision, batch_size=batch_size)
        state = SimpleNamespace(config=config, info=info if info is not None else {})
        state.record = lambda target, **values: target.update(values)
        settle_execution(state, SimpleNamespace(gpus_per_actor=gpus))
        return state.info["execution"]

    assert settled("auto", 0) == {"device": "cpu", "precision": "fp32", "batch_size": 32}
    assert settled("auto", 1.0) == {"device": "cuda", "precision": "bf16", "batch_size": 256}
    assert settled("bf16", 0, batch_size=8) == {"device": "cpu", "precision": "bf16", "batch_size": 8}
    resumed_on_a_cpu = settled("auto", 0, info={"execution": {"precision": "bf16"}})
    assert resumed_on_a_cpu["precision"] == "bf16"
    started_on_a_gpu_before_it_was_recorded = {"attempts": [{"resources": {"gpus_per_actor": 1.0}}]}
    assert settled("auto", 0, info=started_on_a_gpu_before_it_was_recorded)["precision"] == "bf16"
    model = load_model(load_checkpoint(checkpoint))
    dtypes = {
        p: explain_engine(model, load_checkpoint(checkpoint), {"precision": p}).autocast_dtype
        for p in ("fp32", "bf16", "auto")
    }
    assert dtypes == {"fp32": None, "bf16": torch.bfloat16, "auto": None}  # auto on a CPU: fp32


def test_a_model_failure_is_isolated_to_its_image(ray_session, dataset_dir, checkpoint, finished):
    """One image that breaks the model becomes a `model` error row; its batch-mates are explained."""
    import ray

    from audit.pipeline.stages import Explainer

    schema = pq.read_schema(finished / "schema.parquet")
    config = json.loads((finished / "run.json").read_text())["config"]
    explainer = Explainer([ray.put(checkpoint.read_bytes())], config, schema)
    manifest = pd.read_parquet(finished / "manifest.parquet").iloc[10:14]
    batch = {c: manifest[c].to_numpy() for c in manifest.columns}
    batch["kinds"] = np.array(["pred,label"] * 4, dtype=object)
    batch = read_batch(batch, (64, 64), "auto")
    batch["payload"][2], batch["payload_kind"][2] = bytes(64 * 64 * 3), "pixels"  # a blank image
    real = explainer.engine.explain_many

    def fragile(images, sets):
        if (images.flatten(1).std(dim=1) == 0).any():
            raise RuntimeError("cannot explain a blank image\nsecond line")
        return real(images, sets)

    explainer.engine.explain_many = fragile
    rows = explainer(batch).to_pandas()
    assert len(rows) == 8
    failed = rows[rows["status"] == "error"]
    assert set(failed["image_id"]) == {manifest["image_id"].iloc[2]}
    assert (failed["error_stage"] == "model").all()
    assert (failed["error"] == "RuntimeError: cannot explain a blank image").all()
    assert (rows[rows["status"] == "ok"]["map_gradcam"].map(len) == 4).all()


def test_resource_plan_leaves_cpu_for_decoding(ray_session):
    from audit.pipeline.cluster import plan_resources

    plan = plan_resources()
    assert plan.actors == 1 and plan.gpus_per_actor == 0
    assert plan.cpus_per_actor + plan.read_cpus <= 2 and plan.torch_threads >= 1
    assert plan_resources(actors=3).actors == 3


def test_a_node_resource_places_the_job_and_one_no_node_holds_is_one_line(ray_session):
    from audit.pipeline.cluster import ClusterError, plan_resources

    with pytest.raises(ClusterError, match="no node of the Ray cluster has the resource 'gpu-pool'"):
        plan_resources(node_resource="gpu-pool")
    assert plan_resources().resources == {}


def test_bench_pipeline_reports_throughput_and_memory(ray_session, tmp_path):
    from audit.pipeline.bench import bench_pipeline

    cache = os.environ.get("CAM_AUDIT_CACHE")
    result = bench_pipeline(images=8, image_size=32, batch_size=8, photo_size=(48, 64), workdir=tmp_path)
    assert result.images == result.large_images == 32 and result.photo_size == [48, 64]
    assert result.explain_images_per_s > 0 and result.forward_images_per_s > 0
    assert result.explain_steady_images_per_s > 0 and result.forward_steady_images_per_s > 0
    assert result.device == "cpu"  # the session's Ray has no GPU
    assert 0 < result.first_batch_s
    assert 0 < result.decode_ms_per_image and 0 < result.pillow_decode_ms_per_image
    assert result.gpu_utilisation is None if not torch.cuda.is_available() else result.gpu_utilisation >= 0
    assert result.ratio_vs_forward == pytest.approx(result.explain_images_per_s / result.forward_images_per_s, rel=0.01)
    assert result.default_vs_forward == pytest.approx(
        result.default_images_per_s / result.forward_images_per_s, rel=0.01
    )
    assert result.peak_rss_mb_small > 0 and result.memory_growth > 0
    assert not list(tmp_path.iterdir())  # its datasets, runs and mask cache are cleaned up
    assert os.environ.get("CAM_AUDIT_CACHE") == cache  # and the session's cache setting restored


def test_manifest_with_boxes_gets_loc_delta(ray_session, dataset_dir, checkpoint, tmp_path):
    images = sorted((dataset_dir / "HAM10000_images_part_1").glob("*.jpg"))[6:12]
    frame = pd.DataFrame(
        {
            "path": [str(p) for p in images],
            "label_name": ["nv"] * 6,
            "box_x0": [0.25] * 5 + [None],
            "box_y0": [0.25] * 5 + [None],
            "box_x1": [0.75] * 5 + [None],
            "box_y1": [0.75] * 5 + [None],
        }
    )
    frame.to_csv(dataset_dir / "boxes.csv", index=False)
    config = RunConfig(
        dataset="manifest",
        data_dir=str(dataset_dir / "boxes.csv"),
        model=str(checkpoint),
        out=str(tmp_path),
        masks="none",
        sanity_images=0,  # the check is tested on `finished`
    )
    rows = _rows(run_audit(config, Execution(progress=False))).sort_values("source_row")
    assert (rows["status"] == "ok").all()
    assert rows["loc_consensus"].iloc[:5].between(0, 1).all() and pd.isna(rows["loc_consensus"].iloc[5])
    assert rows["energy_in_mask_consensus"].isna().all() and (rows["mask_source"] == "none").all()
    assert rows[list(OCCLUSION_COLUMNS)].isna().all().all()  # no mask: nothing to hide, and the notes say so
    assert rows["notes"].str.contains("occlusion: no object mask").all()
    assert rows[list(FAITHFULNESS_COLUMNS)].notna().all().all()


def test_report_of_a_real_run_accounts_for_every_row(finished, tmp_path):
    """Both target kinds, error rows of every stage, pictures from the dataset's own files."""
    from audit.report import build_report

    run_dir = tmp_path / finished.name
    shutil.copytree(finished, run_dir)
    result = build_report(run_dir)
    summary = result.summary
    counts = count_rows(run_dir)
    assert (summary["rows"], summary["errors"]) == (counts["rows"], counts["errors"])
    assert {c["target_kind"] for c in summary["classes"]} == {"pred", "label"}
    rows = _rows(run_dir)
    outside = rows[~rows["label_name"].isin(CLASSES)]  # a label the model does not know: an error row only
    assert (outside["status"] == "error").all()
    assert sum(c["n"] for c in summary["classes"]) + len(outside) == len(rows)
    html = (run_dir / "report.html").read_text()
    cards = html.count('class="card"')
    assert cards >= len(CLASSES) and "data:image/jpeg;base64," in html
    # the gallery's guided maps, from the run's own checkpoint, one per card with a decodable image
    shown = html.count("<figcaption>Guided Grad-CAM++</figcaption>")
    assert 0 < shown <= cards and shown == html.count("<figcaption>Guided Grad-CAM</figcaption>")
    assert 'id="sanity"' in html and summary["sanity"]["images"] == IMAGES - 4


def test_report_without_the_runs_checkpoint_says_why_there_are_no_guided_maps(finished, tmp_path):
    from audit.report import build_report

    run_dir = tmp_path / finished.name
    shutil.copytree(finished, run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    info["config"]["model"] = str(tmp_path / "moved.pt")
    (run_dir / "run.json").write_text(json.dumps(info))
    html = build_report(run_dir).html_path.read_text()
    assert "Guided Grad-CAM++</figcaption>" not in html
    assert (
        f"No Guided Grad-CAM maps: the run&#39;s model cannot be loaded: checkpoint not found: {tmp_path / 'moved.pt'}"
        in html
    )
