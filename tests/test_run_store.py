"""Runs on object storage: `--out s3://...` writes a run to a bucket (moto's server on 127.0.0.1),
and report, compare, baseline, --keep and --resume work there; a history without a lock stays
right when two runs finish together."""

from __future__ import annotations

import io
import json
import os
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from audit import history, run_store
from audit.cli import main
from audit.data.storage import child, read_bytes

from .conftest import _free_port, start_s3_server
from .storage_fixtures import IMAGES

RUNS = "audit-runs"
HISTORY = f"s3://{RUNS}/audits"


@pytest.fixture(scope="module")
def runs_bucket(s3):
    s3.create_dir(RUNS)
    return s3


def _audit(data: str, store_checkpoint, name: str, *extra: str, dataset: str = "manifest"):
    return CliRunner().invoke(
        main,
        [
            "run",
            *("--dataset", dataset, "--data-dir", data, "--checkpoint", str(store_checkpoint)),
            *("--out", HISTORY, "--name", name, "--batch-size", "4", "--evidence", "none", "--sanity-images", "0"),
            *extra,
        ],
    )


def _objects(s3, prefix: str) -> dict[str, bytes]:
    infos = s3.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    found = {}
    for info in infos:
        if info.type == pafs.FileType.File:
            with s3.open_input_stream(info.path) as stream:
                found[info.path[len(prefix) + 1 :]] = stream.read()
    return found


def test_a_run_on_a_bucket_is_reported_pinned_compared_and_kept_there(
    ray_session, runs_bucket, bucket_copy, store_checkpoint
):
    first = _audit(bucket_copy, store_checkpoint, "ds")
    assert first.exit_code == 0, first.output
    first_uri = first.output.strip().splitlines()[-1]
    assert first_uri.startswith(f"{HISTORY}/ds/") and f"report: {first_uri}/report.html" in first.output
    first_id = first_uri.rsplit("/", 1)[1]
    stored = _objects(runs_bucket, f"{RUNS}/audits/ds/{first_id}")
    assert {"run.json", "manifest.parquet", "schema.parquet", "summary.json", "report.html"} <= set(stored)
    assert sum(name.startswith("explanations/part-") for name in stored) == 3  # 10 images + 2 errors, by 4
    info = json.loads(stored["run.json"])
    assert info["status"] == "complete" and info["config"]["out"] == HISTORY
    assert info["counts"]["rows"] == info["counts"]["expected_rows"] == 12
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    assert not any(secret in content for content in stored.values())  # no credential in a run
    assert read_bytes(f"{HISTORY}/ds/latest").decode().strip() == first_id

    report = CliRunner().invoke(main, ["report", f"{HISTORY}/ds/latest", "--json"])
    assert report.exit_code == 0, report.output
    assert json.loads(report.output[report.output.index("{") :])["run_id"] == first_id

    pinned = CliRunner().invoke(main, ["baseline", first_uri])
    assert pinned.exit_code == 0 and pinned.output.strip() == f"{HISTORY}/ds/baseline"

    second = _audit(bucket_copy, store_checkpoint, "ds", "--baseline", f"{HISTORY}/ds/baseline", "--keep", "1")
    assert second.exit_code == 0, second.output
    second_uri = second.output.strip().splitlines()[-1]
    comparison = json.loads(read_bytes(f"{second_uri}/compare.json"))
    assert comparison["baseline_dir"] == first_uri and comparison["baseline_run_id"] == first_id
    assert read_bytes(f"{HISTORY}/ds/latest").decode().strip() == second_uri.rsplit("/", 1)[1]
    assert history.is_run(first_uri), "--keep 1 deleted the baseline"

    compared = CliRunner().invoke(main, ["compare", f"{HISTORY}/ds/baseline", f"{HISTORY}/ds/latest", "--json"])
    assert compared.exit_code == 0, compared.output


def test_a_run_is_resumed_from_the_bucket_on_a_node_without_its_working_copy(
    ray_session,
    runs_bucket,
    bucket_copy,
    store_checkpoint,
    monkeypatch,
    tmp_path,
):
    """The HAM10000 layout in the bucket, audited to the bucket; one batch lost and the run
    marked interrupted; resumed and reported on a node that never saw it."""
    ham10000 = bucket_copy.rsplit("/", 1)[0]
    done = _audit(ham10000, store_checkpoint, "resumed", "--no-report", dataset="ham10000")
    assert done.exit_code == 0, done.output
    uri = done.output.strip().splitlines()[-1]
    key = uri.removeprefix("s3://")
    before = _objects(runs_bucket, key)
    parts = sorted(name for name in before if name.startswith("explanations/part-"))
    lost = pq.read_table(io.BytesIO(before[parts[0]])).num_rows
    runs_bucket.delete_file(f"{key}/{parts[0]}")  # the batch an interrupted driver never wrote
    info = json.loads(before["run.json"])
    info.update(status="interrupted", lease={})
    with runs_bucket.open_output_stream(f"{key}/run.json") as out:
        out.write(json.dumps(info).encode())

    monkeypatch.setenv("CAM_AUDIT_CACHE", str(tmp_path / "another-node"))  # no working copy here
    resumed = CliRunner().invoke(main, ["run", "--resume", uri, "--report"])
    assert resumed.exit_code == 0, resumed.output
    assert resumed.output.strip().splitlines()[-1] == uri
    after = _objects(runs_bucket, key)
    info = json.loads(after["run.json"])
    assert info["status"] == "complete" and len(info["attempts"]) == 2
    assert info["attempts"][1]["computed_rows"] == lost and info["counts"]["rows"] == IMAGES
    assert sorted(n for n in after if n.startswith("explanations/part-")) == parts
    assert json.loads(after["summary.json"])["run_id"] == uri.rsplit("/", 1)[1]  # reported there
    assert (tmp_path / "another-node" / "runs").is_dir()


def _fake_run(s3, history_uri: str, run_id: str, status: str = "complete", **info) -> str:
    """A run.json as a driver leaves it: enough for pointers and retention."""
    uri = child(history_uri, run_id)
    record = {"run_id": run_id, "status": status, "config": {}, "model": {"classes": []}, **info}
    with s3.open_output_stream(f"{uri.removeprefix('s3://')}/run.json") as out:
        out.write(json.dumps(record).encode())
    return uri


def _ids(n: int) -> list[str]:
    start = datetime(2026, 12, 1, tzinfo=timezone.utc)
    return [history.run_id(start + timedelta(minutes=i), f"{i:08x}") for i in range(n)]


def test_two_runs_finishing_together_cannot_leave_latest_on_the_older(runs_bucket, monkeypatch):
    """The older run reads `latest` while the newer is still running; the newer completes, moves
    `latest`, and the older writes last. The file then names the older run, but readers resolve
    `latest` to the newer one, and the next run to complete rewrites the file."""
    where = f"{HISTORY}/race"
    older, newer, next_one = _ids(3)
    older_copy = run_store.working_copy(_fake_run(runs_bucket, where, older))
    newer_copy = run_store.working_copy(_fake_run(runs_bucket, where, newer, status="running"))
    older_read, newer_wrote = threading.Event(), threading.Event()
    read_pointer, write_pointer = history._stored_pointer, run_store.write_pointer

    def read_then_signal(history_uri, pointer):
        found = read_pointer(history_uri, pointer)
        if threading.current_thread().name == older:
            older_read.set()
        return found

    def older_writes_last(history_uri, pointer, run_id):
        if run_id == older:
            assert newer_wrote.wait(timeout=10)
        written = write_pointer(history_uri, pointer, run_id)
        newer_wrote.set()
        return written

    def newer_finishes():
        assert older_read.wait(timeout=10)
        _fake_run(runs_bucket, where, newer)  # its run.json says complete, then it moves latest
        history.mark_latest(newer_copy)

    monkeypatch.setattr(history, "_stored_pointer", read_then_signal)
    monkeypatch.setattr(run_store, "write_pointer", older_writes_last)
    threads = [
        threading.Thread(target=history.mark_latest, args=(older_copy,), name=older),
        threading.Thread(target=newer_finishes, name=newer),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    monkeypatch.undo()
    assert not any(thread.is_alive() for thread in threads) and newer_wrote.is_set()

    assert read_bytes(f"{where}/latest").decode().strip() == older  # the race happened
    assert history.resolve_run(f"{where}/latest").name == newer  # and readers see through it
    assert history.pointer_exists(f"{where}/latest")
    history.mark_latest(run_store.working_copy(_fake_run(runs_bucket, where, next_one)))
    assert read_bytes(f"{where}/latest").decode().strip() == next_one


def test_many_runs_finishing_and_pruning_at_once_keep_the_newest_and_what_latest_names(runs_bucket):
    where = f"{HISTORY}/crowd"
    ids = _ids(6)
    copies = [run_store.working_copy(_fake_run(runs_bucket, where, run)) for run in ids]

    def finish(copy: Path) -> None:
        history.mark_latest(copy)
        history.prune(where, 2, protect=(copy,))

    threads = [threading.Thread(target=finish, args=(copy,)) for copy in copies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert history.resolve_run(f"{where}/latest").name == ids[-1]
    assert history.prune(where, 2) == [child(where, run) for run in ids[:-2] if history.is_run(child(where, run))]
    assert sorted(run_store.run_ids(where)) == ids[-2:]  # nothing else left, nothing newer lost


def _lease(age_s: float) -> dict:
    """A lease from a driver on another machine whose last heartbeat is ``age_s`` old."""
    beat = datetime.now(timezone.utc) - timedelta(seconds=age_s)
    return {"host": "another-node", "pid": 1, "heartbeat": beat.isoformat()}


def test_keep_on_a_bucket_spares_pointed_live_compared_and_unreadable_runs_and_prunes_dead_ones(runs_bucket):
    where = f"{HISTORY}/keep"
    plain, pinned, compared, dead, live, damaged, latest, failed = _ids(8)
    for run in (plain, pinned, compared, latest):
        _fake_run(runs_bucket, where, run)
    _fake_run(runs_bucket, where, dead, status="running", lease=_lease(3600))
    _fake_run(runs_bucket, where, live, status="running", lease=_lease(1), config={"baseline": child(where, compared)})
    _fake_run(runs_bucket, where, failed, status="failed")  # newer than `latest`, never complete
    with runs_bucket.open_output_stream(f"{where.removeprefix('s3://')}/{damaged}/run.json") as out:
        out.write(b'{"run_id": "cut sh')
    run_store.write_pointer(where, history.BASELINE, pinned)
    run_store.write_pointer(where, history.LATEST, latest)
    doomed_copy = run_store.working_copy(child(where, plain))

    assert history.resolve_run(f"{where}/latest").name == latest  # a failed newer run is not `latest`
    deleted = history.prune(where, 1)
    assert sorted(deleted) == [child(where, plain), child(where, dead)]
    assert not history.is_run(child(where, plain)) and not doomed_copy.exists()
    assert all(history.is_run(child(where, run)) for run in (pinned, compared, live, damaged, latest, failed))


def test_a_baseline_pointer_whose_run_is_gone_fails_the_gate_instead_of_skipping_it(runs_bucket):
    where = f"{HISTORY}/dangling"
    (gone,) = _ids(1)
    run_store.write_pointer(where, history.BASELINE, gone)
    assert history.pointer_exists(f"{where}/baseline")
    with pytest.raises(history.HistoryError, match=f"no run at {where}/baseline"):
        history.resolve_run(f"{where}/baseline")
    assert not history.pointer_exists(f"{where}/latest")


def test_pinning_a_stored_run_reads_its_run_json_and_fetches_nothing(runs_bucket):
    where = f"{HISTORY}/pin"
    good, damaged = _ids(2)
    _fake_run(runs_bucket, where, good)
    with runs_bucket.open_output_stream(f"{where.removeprefix('s3://')}/{damaged}/run.json") as out:
        out.write(json.dumps({"run_id": damaged}).encode())
    assert history.pin_baseline(child(where, good)) == f"{where}/baseline"
    assert read_bytes(f"{where}/baseline").decode().strip() == good
    assert not run_store._working_folder(child(where, good)).exists()
    with pytest.raises(history.HistoryError, match=r"is not a cam-audit run file \(no status"):
        history.pin_baseline(child(where, damaged))
    with pytest.raises(history.HistoryError, match=f"no run at {where}/nothing"):
        history.pin_baseline(f"{where}/nothing")


def test_resume_takes_a_stored_run_over_before_fetching_it_and_refuses_a_live_one(runs_bucket):
    where = f"{HISTORY}/takeover"
    live, dead, newest = _ids(3)
    _fake_run(runs_bucket, where, live, status="running", lease=_lease(1))
    _fake_run(runs_bucket, where, dead, status="interrupted", lease=_lease(3600))
    _fake_run(runs_bucket, where, newest)
    with pytest.raises(history.HistoryError, match=f"run {live} is still running"):
        history.take_over(child(where, live), history.new_lease())
    mine = history.new_lease()
    copy = history.take_over(child(where, dead), mine)
    stored = json.loads(read_bytes(child(where, f"{dead}/run.json")))
    assert stored["lease"] == mine and stored["status"] == "running"
    assert json.loads((copy / "run.json").read_text())["lease"] == mine
    assert history.prune(where, 1) == []  # the taken-over run is live now, as is the other


def test_a_resume_refused_before_any_work_hands_the_stored_run_back(runs_bucket):
    from audit.pipeline.run import RunError, resume_audit

    where = f"{HISTORY}/handback"
    (run,) = _ids(1)
    _fake_run(runs_bucket, where, run, status="interrupted", lease=_lease(3600))  # its config is empty
    with pytest.raises(RunError, match="is not a cam-audit run file"):
        resume_audit(child(where, run))
    stored = json.loads(read_bytes(child(where, f"{run}/run.json")))
    assert stored["status"] == "interrupted" and stored["lease"] == {}
    assert history.take_over(child(where, run), history.new_lease()).name == run  # free to try again


def test_a_fetch_refreshes_the_working_copy_and_leaves_temporary_files_alone(runs_bucket):
    uri = _fake_run(runs_bucket, f"{HISTORY}/fetch", _ids(1)[0])
    copy = run_store.fetch(uri)
    (copy / "explanations").mkdir()
    (copy / "explanations" / "part-gone.parquet").write_bytes(b"pruned from the store")
    (copy / "explanations" / ".part-new.parquet.tmp").write_bytes(b"a driver here writing")
    _fake_run(runs_bucket, f"{HISTORY}/fetch", uri.rsplit("/", 1)[1], status="interrupted")
    run_store.fetch(uri)
    assert json.loads((copy / "run.json").read_text())["status"] == "interrupted"
    assert not (copy / "explanations" / "part-gone.parquet").exists()
    assert (copy / "explanations" / ".part-new.parquet.tmp").exists()


def test_drivers_starting_the_same_run_in_the_same_second_get_different_run_ids(runs_bucket):
    where = f"{HISTORY}/claims"
    (wanted,) = _ids(1)
    start = threading.Barrier(4)
    claimed: list[str] = []

    def claim() -> None:
        start.wait(timeout=10)
        claimed.append(run_store.claim_run(where, wanted).name)

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(claimed) == 4 and len(set(claimed)) == 4, claimed
    assert all(run == wanted or run.startswith(f"{wanted}-") for run in claimed)
    assert run_store.claim_run(where, wanted).name not in claimed  # a later one takes a free id too


def test_a_history_on_a_file_uri_works_like_a_bucket(tmp_path):
    where = f"file://{tmp_path}/audits/ds"
    older, newer = _ids(2)
    for run in (older, newer):
        copy = run_store.claim_run(where, run)
        (copy / "run.json").write_text(json.dumps({"run_id": run, "status": "complete"}))
        run_store.publish(copy, "run.json")
        history.mark_latest(copy)
    assert (tmp_path / "audits" / "ds" / "latest").read_text().strip() == newer
    assert history.resolve_run(f"{where}/latest").name == newer
    assert history.prune(where, 1) == [f"{where}/{older}"] and not (tmp_path / "audits" / "ds" / older).exists()


def test_a_store_that_refuses_the_credential_or_has_no_bucket_is_one_line(s3, store_checkpoint):
    """A second S3 server that checks credentials (moto's IAM mode), which ours are not valid for."""
    port = _free_port()
    server = start_s3_server(port, INITIAL_NO_AUTH_ACTION_COUNT="0")
    try:
        cli_env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        args = ["--dataset", "synthetic", "--checkpoint", str(store_checkpoint), "--limit", "1"]
        refused = CliRunner(env=cli_env).invoke(main, ["run", *args, "--out", "s3://locked-bucket/audits"])
        assert refused.exit_code == 2, refused.output
        (line,) = refused.output.strip().splitlines()
        assert line.startswith("error: cannot write s3://locked-bucket/audits/") and "Traceback" not in line
        listed = CliRunner(env=cli_env).invoke(main, ["report", "s3://locked-bucket/audits/ds/latest"])
        assert listed.exit_code == 2 and len(listed.output.strip().splitlines()) == 1, listed.output
    finally:
        server.terminate()
        server.wait(timeout=10)
    missing = CliRunner().invoke(main, ["run", *args, "--out", "s3://no-such-bucket/audits"])
    assert missing.exit_code == 2 and len(missing.output.strip().splitlines()) == 1, missing.output
    assert "no-such-bucket" in missing.output
    gone = CliRunner().invoke(main, ["report", "s3://no-such-bucket/audits/ds/latest"])
    assert gone.exit_code == 2 and "no run at s3://no-such-bucket/audits/ds/latest" in gone.output
