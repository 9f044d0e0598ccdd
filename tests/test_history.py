"""Run history: ids that sort by time, the latest and baseline pointers, and retention."""

from __future__ import annotations

import errno
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from audit import history
from audit.cli import main
from audit.history import BASELINE, LATEST, HistoryError, create_run_dir, mark_latest, point, pointed, prune, runs


def _run(folder: Path, run_id: str, status: str = "complete") -> Path:
    run = folder / run_id
    run.mkdir(parents=True)
    (run / "run.json").write_text(
        json.dumps({"run_id": run_id, "status": status, "config": {}, "model": {"classes": ["a", "b"]}})
    )
    return run


def _history(folder: Path, count: int) -> list[Path]:
    start = datetime(2026, 11, 1, 2, 0, tzinfo=timezone.utc)
    return [_run(folder, history.run_id(start + timedelta(days=i), f"{i:08x}")) for i in range(count)]


def test_run_ids_sort_by_start_time_and_never_collide(tmp_path):
    early = history.run_id(datetime(2026, 11, 9, 23, 59, 59, tzinfo=timezone.utc), "ffffffff")
    late = history.run_id(datetime(2026, 11, 10, 0, 0, 0, tzinfo=timezone.utc), "00000000")
    assert early == "20261109-235959-ffffffff" and sorted([late, early]) == [early, late]
    first = create_run_dir(tmp_path / "audit", late)
    second = create_run_dir(tmp_path / "audit", late)  # the same options, model and data in the same second
    assert (first.name, second.name) == (late, f"{late}-2")
    for run in (first, second):
        (run / "run.json").write_text("{}")
    assert runs(tmp_path / "audit") == [first, second]


def test_latest_names_the_newest_complete_run(tmp_path):
    old, new = _history(tmp_path, 2)
    mark_latest(new)
    mark_latest(old)  # an older run resumed to completion later does not take it back
    assert pointed(tmp_path, LATEST) == new.resolve()
    assert (tmp_path / LATEST).is_symlink() and json.loads((tmp_path / LATEST / "run.json").read_text())


def test_pointers_work_without_symbolic_links(tmp_path, monkeypatch):
    old, new = _history(tmp_path, 2)

    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "operation not permitted")

    monkeypatch.setattr(Path, "symlink_to", no_links)
    point(tmp_path, BASELINE, old)
    assert (tmp_path / BASELINE).read_text().strip() == old.name
    assert history.resolve_run(tmp_path / BASELINE) == old.resolve()


def test_a_pointer_only_names_a_run_of_its_own_history(tmp_path):
    (run,) = _history(tmp_path / "a", 1)
    with pytest.raises(HistoryError, match="is not a run of"):
        point(tmp_path / "b", LATEST, run)
    with pytest.raises(HistoryError, match="not a run directory"):
        history.resolve_run(tmp_path)


def test_retention_keeps_the_newest_and_never_the_baseline_or_a_running_run(tmp_path):
    made = _history(tmp_path, 6)
    point(tmp_path, BASELINE, made[0])
    (made[1] / "run.json").write_text(json.dumps({"status": "running"}))  # another job may be writing it
    mark_latest(made[5])
    deleted = prune(tmp_path, keep=2, protect=(made[2],))
    assert deleted == [made[3]]
    assert runs(tmp_path) == [made[0], made[1], made[2], made[4], made[5]]
    assert prune(tmp_path, keep=2) == [made[2]]  # no longer protected by a caller


def test_baseline_command_pins_a_run(tmp_path):
    old, new = _history(tmp_path, 2)
    result = CliRunner().invoke(main, ["baseline", str(old)])
    assert result.exit_code == 0, result.output
    assert Path(result.stdout.strip()) == tmp_path / BASELINE and pointed(tmp_path, BASELINE) == old.resolve()
    assert prune(tmp_path, keep=1) == []  # the newest and the baseline: nothing else to delete
    missing = CliRunner().invoke(main, ["baseline", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no run at" in missing.stderr


def test_a_baseline_pointer_not_yet_set_is_skipped_but_a_missing_run_is_an_error(tmp_path, capsys):
    from audit.cli import _baseline

    assert _baseline(str(tmp_path / "nightly" / BASELINE)) is None  # the first night: nothing pinned yet
    assert "not compared with a baseline" in capsys.readouterr().err
    with pytest.raises(HistoryError, match="no run at"):
        _baseline(str(tmp_path / "nightly" / "20261101-020000-00000000"))
    (run,) = _history(tmp_path / "nightly", 1)
    point(tmp_path / "nightly", BASELINE, run)
    assert _baseline(str(tmp_path / "nightly" / BASELINE)) == str(run.resolve())


# --- leases: a dead run told from a live one ---------------------------------------------------


def _running(folder: Path, run_id: str, **lease) -> Path:
    run = _run(folder, run_id, status="running")
    info = json.loads((run / "run.json").read_text())
    info["lease"] = {"host": "this-host", "pid": 1, "heartbeat": _ago(0), **lease}
    (run / "run.json").write_text(json.dumps(info))
    return run


def _ago(seconds: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(seconds=seconds)).isoformat()


def _gone_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_run_on_this_host_is_live_while_its_driver_is(tmp_path):
    import os
    import socket

    here = socket.gethostname()
    live = _running(tmp_path, "20261201-010000-aaaaaaaa", host=here, pid=os.getpid())
    dead = _running(tmp_path, "20261201-020000-bbbbbbbb", host=here, pid=_gone_pid())
    assert history.liveness(history.read_run_info(live), live) == "live"
    assert history.liveness(history.read_run_info(dead), dead) == "dead"  # at once: no need to wait for the timeout


def test_a_run_on_another_host_is_judged_by_its_heartbeat(tmp_path):
    fresh = _running(tmp_path, "20261201-010000-aaaaaaaa", host="elsewhere", heartbeat=_ago(5))
    stale = _running(tmp_path, "20261201-020000-bbbbbbbb", host="elsewhere", heartbeat=_ago(600))
    assert history.liveness(history.read_run_info(fresh), fresh) == "live"
    assert history.liveness(history.read_run_info(stale), stale) == "dead"
    assert "elsewhere" in history.lease_note(history.read_run_info(stale))


def test_a_run_without_a_lease_is_judged_by_the_age_of_its_run_file(tmp_path):
    import os

    run = _run(tmp_path, "20261201-010000-aaaaaaaa", status="running")
    assert history.liveness(history.read_run_info(run), run) == "live"
    old = (datetime.now(timezone.utc) - timedelta(hours=1)).timestamp()
    os.utime(run / "run.json", (old, old))
    assert history.liveness(history.read_run_info(run), run) == "dead"
    assert history.liveness({"status": "complete"}) == "finished"


def test_retention_prunes_dead_runs_and_keeps_live_ones(tmp_path):
    import os
    import socket

    dead = _running(tmp_path, "20261201-010000-aaaaaaaa", host="elsewhere", heartbeat=_ago(600))
    live = _running(tmp_path, "20261201-020000-bbbbbbbb", host=socket.gethostname(), pid=os.getpid())
    newest = _run(tmp_path, "20261201-030000-cccccccc")
    assert prune(tmp_path, keep=1) == [dead]
    assert runs(tmp_path) == [live, newest]
