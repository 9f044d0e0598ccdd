"""jobs/: the KubeRay manifests carry what KubeRay needs, and jobs/submit.sh runs a real audit as a
Ray job on a Ray head that the test starts on this machine."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import yaml

from audit.cli import run_command
from audit.config import read_config_file
from audit.data.ham10000 import CLASSES
from audit.data.storage import is_uri
from audit.data.synthetic import SyntheticSpec, generate
from audit.history import BASELINE, LATEST, point, pointed, runs
from audit.models.checkpoint import save_random_checkpoint
from tests.report_runs import class_rows, write_run

JOBS = Path(__file__).resolve().parents[1] / "jobs"
CREDENTIALS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS"}
CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")


def _documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((JOBS / name).read_text()) if d]


def _only(name: str, kind: str) -> dict:
    (document,) = [d for d in _documents(name) if d["kind"] == kind]
    assert document["apiVersion"] == "ray.io/v1" and document["metadata"]["name"]
    return document


def _check_pod(template: dict, gpu: bool) -> dict:
    """A pod template with a container image, every mounted volume defined, GPUs where wanted, and
    no credential in its environment."""
    spec = template["spec"]
    (container,) = spec["containers"]
    assert container["name"] and container["image"]
    names = {variable["name"] for variable in container.get("env", [])}
    assert not names & CREDENTIALS, f"credentials in a manifest: {names & CREDENTIALS}"
    assert not container.get("envFrom"), "variables loaded from a secret or config map"
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
    assert set(mounts) <= set(volumes), f"volume mounts without a volume: {set(mounts) - set(volumes)}"
    limits = container["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) is gpu
    return {"mounts": mounts, "volumes": volumes, "account": spec.get("serviceAccountName")}


def _check_rayjob_spec(spec: dict) -> None:
    assert spec["shutdownAfterJobFinishes"] is True
    command = shlex.split(spec["entrypoint"])
    assert command[:3] == ["audit", "run", "--config"]
    run_command.make_context("run", command[2:])  # the options exist and parse
    cluster = spec["rayClusterSpec"]
    head = _check_pod(cluster["headGroupSpec"]["template"], gpu=False)
    config = Path(command[3])
    config_volume = next(name for name, path in head["mounts"].items() if path == str(config.parent))
    assert head["volumes"][config_volume]["configMap"]["name"]
    assert (JOBS / config.name).is_file()  # the ConfigMap is made from this file
    toml = read_config_file(JOBS / config.name)
    for key in ("data_dir", "model", "out", "baseline"):  # the config's paths lie on the head's volumes
        assert is_uri(toml[key]) or _on_a_mount(toml[key], head["mounts"]), key
    stored = [key for key in ("data_dir", "out", "baseline") if is_uri(toml[key])]
    if stored:  # the cluster's identity reads and writes the buckets: a service account on every pod
        assert head["account"], "a config with bucket locations needs a service account on the head"
    if is_uri(toml["out"]):
        assert toml["baseline"].startswith(f"{toml['out']}/{toml['name']}/"), "the baseline is a run of this history"
    assert "rayStartParams" in cluster["headGroupSpec"]
    workers = cluster["workerGroupSpecs"]
    assert workers and all(w["groupName"] for w in workers)
    for group in workers:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] and "rayStartParams" in group
        pod = _check_pod(group["template"], gpu=True)
        if is_uri(toml["data_dir"]):  # reading runs here
            assert pod["account"] == head["account"]
        else:
            assert _on_a_mount(toml["data_dir"], pod["mounts"])


def _on_a_mount(path: str, mounts: dict[str, str]) -> bool:
    return any(Path(path).is_relative_to(mount) for mount in mounts.values())


def test_rayjob_manifest_has_what_kuberay_requires_and_keeps_data_and_runs_in_buckets():
    spec = _only("rayjob.yaml", "RayJob")["spec"]
    _check_rayjob_spec(spec)
    toml = read_config_file(JOBS / "ham10000.toml")
    assert all(is_uri(toml[key]) for key in ("data_dir", "out", "baseline"))


def test_the_pvc_variant_is_the_same_job_with_volumes():
    bucket, pvc = _only("rayjob.yaml", "RayJob")["spec"], _only("rayjob-pvc.yaml", "RayJob")["spec"]
    _check_rayjob_spec(pvc)
    assert pvc["entrypoint"] == bucket["entrypoint"].replace("ham10000.toml", "ham10000-pvc.toml")
    stored, mounted = read_config_file(JOBS / "ham10000.toml"), read_config_file(JOBS / "ham10000-pvc.toml")
    locations = ("data_dir", "out", "baseline")
    assert {k: v for k, v in stored.items() if k not in locations} == {
        k: v for k, v in mounted.items() if k not in locations
    }
    assert not any(is_uri(mounted[key]) for key in locations)


def test_raycronjob_manifest_schedules_the_same_job_nightly():
    cron = _only("raycronjob.yaml", "RayCronJob")
    fields = cron["spec"]["schedule"].split()
    assert len(fields) == 5 and all(CRON_FIELD.match(f) for f in fields)
    assert fields[2:] == ["*", "*", "*"] and fields[1] != "*"  # once a day
    _check_rayjob_spec(cron["spec"]["jobTemplate"])
    assert cron["spec"]["jobTemplate"] == _only("rayjob.yaml", "RayJob")["spec"]  # one job, two ways to start it
    assert "RayCronJob" in (JOBS / "raycronjob.yaml").read_text().split("apiVersion")[0]  # the feature gate is named


# --- a real Ray job ---------------------------------------------------------------------


def _hand_made_run(history: Path, run_id: str) -> Path:
    rows = [row for label in range(len(CLASSES)) for row in class_rows(label, 3, list(CLASSES))]
    return write_run(history / run_id, rows, list(CLASSES), input_size=(64, 64))


def test_submit_recipe_runs_an_audit_as_a_ray_job(ray_head, tmp_path):
    data = generate(tmp_path / "data", SyntheticSpec(images=24, height=48, width=64, seed=3), workers=1)
    checkpoint = tmp_path / "model.pt"
    save_random_checkpoint(checkpoint, "resnet18", CLASSES, (64, 64))
    history = tmp_path / "reports" / "nightly"
    pinned = _hand_made_run(history, "20200101-000000-aaaaaaaa")
    old = _hand_made_run(history, "20200102-000000-bbbbbbbb")
    point(history, BASELINE, pinned)
    config = tmp_path / "job" / "nightly.toml"
    config.parent.mkdir()
    config.write_text(
        "\n".join(
            [
                'dataset = "synthetic"',
                f'data_dir = "{data}"',
                f'checkpoint = "{checkpoint}"',
                f'out = "{tmp_path / "reports"}"',
                'name = "nightly"',
                "batch_size = 8",
                "keep = 1",
                f'baseline = "{history / BASELINE}"',
                "gallery = 1",
                "sanity_images = 0",  # the job recipe is tested here; the sanity check and the
                'evidence = "none"',  # evidence are tested in test_pipeline.py
            ]
        )
    )
    submitted = subprocess.run(
        ["bash", str(JOBS / "submit.sh"), str(config)],
        env=ray_head,
        capture_output=True,
        text=True,
        timeout=480,
    )
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output[-4000:]
    assert "succeeded" in output

    (new,) = [run for run in runs(history) if run not in (pinned, old)]
    info = json.loads((new / "run.json").read_text())
    assert info["status"] == "complete" and info["counts"]["rows"] == 24 and info["audit"] == "nightly"
    assert info["attempts"][0]["driver_rows"] == 0  # a driver joining a cluster leaves every batch to the actors
    assert (new / "summary.json").is_file() and (new / "report.html").is_file()
    assert str(new) in output  # the run directory is the job's last line
    compared = json.loads((new / "compare.json").read_text())
    assert compared["baseline_run_id"] == pinned.name
    assert pointed(history, LATEST) == new.resolve()
    assert runs(history) == [pinned, new]  # --keep 1: the old run went, the pinned baseline stayed
