"""A real two-node Ray cluster on this machine: a head and a worker started by `ray start`, the
worker holding a custom resource. `audit run --node-resource` places the read tasks and the
explain actor on the worker, which reads the data from the S3 server; the run is complete and
equal to a single-node run of the same data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from audit.config import RunConfig
from audit.pipeline.run import OUTPUT_DIR, Execution, run_audit
from audit.pipeline.schema import MAP_COLUMNS

from .conftest import _free_port
from .storage_fixtures import IMAGES

RESOURCE = "audit_worker"
BIN = Path(sys.executable).parent


@pytest.fixture
def worker_node(ray_head, tmp_path):
    """A second node joining the head, with 2 CPUs and the custom resource."""
    temp_dir = ray_head["TEST_RAY_TEMP_DIR"]
    worker = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            f"--address={ray_head['RAY_HEAD_GCS']}",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--node-manager-port={_free_port()}",
            f"--object-manager-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            "--num-cpus=2",
            "--num-gpus=0",
            f"--resources={json.dumps({RESOURCE: 1})}",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],
        env=ray_head,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 90
    while _node_ids(ray_head).get(RESOURCE) is None:
        assert worker.poll() is None and time.monotonic() < deadline, "the worker node did not join"
        time.sleep(1)
    yield ray_head
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)


def _state(env: dict, *what: str) -> list[dict]:
    """`ray list ...` on the cluster, as JSON."""
    out = subprocess.run(
        [str(BIN / "ray"), "list", *what, "--format", "json", "--detail", "--limit", "1000"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    start = out.stdout.find("[")  # after any notice Ray prints first
    try:
        return json.loads(out.stdout[start:]) if out.returncode == 0 and start >= 0 else []
    except ValueError:
        return []  # the state API not answering yet


def _placed(env: dict, what: str, field: str, name: str) -> list[dict]:
    """The actors or tasks whose ``field`` holds ``name``, once the cluster has recorded them
    (workers report task events every second or so)."""
    deadline = time.monotonic() + 20
    while True:
        found = [item for item in _state(env, what) if name in (item.get(field) or "") and item.get("node_id")]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(1)


def _node_ids(env: dict) -> dict[str, str]:
    """The id of the head (``head``) and of the node holding the custom resource."""
    found = {}
    for node in _state(env, "nodes"):
        if node.get("state") != "ALIVE":
            continue
        if node.get("is_head_node"):
            found["head"] = node["node_id"]
        if RESOURCE in (node.get("resources_total") or {}):
            found[RESOURCE] = node["node_id"]
    return found


def _rows(run_dir: Path) -> pd.DataFrame:
    files = sorted((run_dir / OUTPUT_DIR).glob("*.parquet"))
    return (
        pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)
        .sort_values("image_id")
        .reset_index(drop=True)
    )


def _values(map_or_none):
    return None if map_or_none is None else list(map_or_none)


@pytest.mark.slow
def test_two_nodes_run_the_job_on_the_worker_from_the_bucket_as_one_node_does(
    worker_node,
    ray_session,
    bucket_copy,
    store_checkpoint,
    tmp_path,
):
    options = ["--batch-size", "4", "--evidence", "none", "--sanity-images", "0", "--no-report"]
    done = subprocess.run(
        [
            str(BIN / "audit"),
            "run",
            *("--dataset", "manifest", "--data-dir", bucket_copy, "--checkpoint", str(store_checkpoint)),
            *("--out", str(tmp_path / "cluster"), "--name", "ds", "--address", worker_node["RAY_HEAD_GCS"]),
            *("--node-resource", RESOURCE, *options),
        ],
        env=worker_node,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = Path(done.stdout.strip().splitlines()[-1])
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "complete" and info["counts"]["rows"] == IMAGES + 2
    assert info["attempts"][0]["resources"]["resources"] == {RESOURCE: 0.001}
    assert info["attempts"][0]["driver_rows"] == 0  # no head start for a run placed on chosen nodes

    nodes = _node_ids(worker_node)
    actors = _placed(worker_node, "actors", "class_name", "Explainer")
    assert actors and {a["node_id"] for a in actors} == {nodes[RESOURCE]}
    reads = _placed(worker_node, "tasks", "name", "read_batch")
    assert reads and {t["node_id"] for t in reads} == {nodes[RESOURCE]}

    single = RunConfig(
        dataset="manifest",
        data_dir=bucket_copy,
        model=str(store_checkpoint),
        out=str(tmp_path / "single"),
        name="ds",
        batch_size=4,
        evidence="none",
        sanity_images=0,
        report=False,
    )
    one = _rows(run_audit(single, Execution(progress=False)))
    two = _rows(run_dir)
    assert one["image_id"].tolist() == two["image_id"].tolist()
    assert one["status"].tolist() == two["status"].tolist() and one["error"].tolist() == two["error"].tolist()
    ok = one["status"] == "ok"
    assert one.loc[ok, "pred"].tolist() == two.loc[ok, "pred"].tolist()
    for column in MAP_COLUMNS:
        assert one.loc[ok, column].map(_values).tolist() == two.loc[ok, column].map(_values).tolist(), column
