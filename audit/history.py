"""Run history: where an audit's runs live, which is the latest, which is the baseline, which may go.

An audit named N keeps its runs in ``OUT/N/``, one folder per run. A run id is the UTC start
time and a short hash of what the run computes (its computing options, the model's sha256 and
the dataset's fingerprint): ``20261122-031500-3f2a9c1e``. Ids sort by time, and two runs with
the same hash computed the same thing. Beside the runs, two pointers name a run by its id:

* ``latest``: the newest complete run, moved when a run completes;
* ``baseline``: the run that later runs are compared with, set by ``audit baseline RUN_DIR``.

A pointer is a relative symbolic link (``cat OUT/N/latest/summary.json`` works), or a one-line
text file holding the run id where the filesystem has no symbolic links and on object storage.
``--keep K`` deletes the oldest runs beyond the newest K, but never a run a pointer names, the
baseline a run was compared with, a live run, or the baseline a live run compares with. Moving
a pointer and deleting runs take a lock on the history, so concurrent runs of one audit are
safe. ``OUT`` may be a URI (``s3://bucket/audits``): :mod:`audit.run_store` says how such runs
are written and read, and how a history without a lock stays safe.

A running driver holds a *lease* in its run.json (its host, process id and a heartbeat it
refreshes every ``LEASE_INTERVAL_S``), so a run killed hard (SIGKILL, a pod eviction), which can
record no end, is told from a live one: ``--resume`` refuses a live run and takes over a dead
one, ``--keep`` prunes dead runs, and the report says which it is.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import posixpath
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psutil

from audit import run_store
from audit.data.storage import StorageError, child, is_uri
from audit.data.storage import is_file as storage_is_file
from audit.data.storage import read_bytes as storage_read
from audit.errors import AuditError, first_line

RUN_FILE = "run.json"
RUN_KEYS = ("run_id", "status", "config", "model")
LEASE_INTERVAL_S = 10.0  # how often a running driver refreshes its heartbeat in run.json
LEASE_TIMEOUT_S = 60.0  # a heartbeat older than this is a dead driver's
LATEST = "latest"
BASELINE = "baseline"
POINTERS = (LATEST, BASELINE)
LOCK_FILE = ".lock"
NO_SYMLINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EACCES)


class HistoryError(AuditError):
    """A run or a pointer that cannot be found or used."""


def run_precision(info: dict) -> str | None:
    """The arithmetic a run's maps were computed in: run.json ``execution``; for runs from before
    it was recorded, what the device implied then (bf16 autocast on a GPU, fp32 on a CPU)."""
    settled = info.get("execution", {}).get("precision")
    if settled:
        return settled
    resources = [a.get("resources") for a in info.get("attempts", []) if a.get("resources")]
    if not resources:
        return None
    return "bf16" if resources[0].get("gpus_per_actor") else "fp32"


def run_id(started: datetime, digest: str) -> str:
    """``YYYYMMDD-HHMMSS-<digest>`` from a UTC time: ids sort by start time."""
    return f"{started:%Y%m%d-%H%M%S}-{digest}"


def history_folder(out: str, name: str) -> Path | str:
    """Where an audit's runs live: ``OUT/NAME``, a folder or a URI."""
    return child(out, name) if is_uri(out) else Path(out) / name


def history_of(run_dir: Path) -> Path | str:
    """The history a run belongs to (a URI for the working copy of a run on object storage)."""
    uri = run_store.origin(run_dir)
    return uri.rsplit("/", 1)[0] if uri else Path(run_dir).parent


def location(run_dir: Path) -> str:
    """Where a run lives, as a user names it: its URI when it is on object storage, else its folder."""
    return run_store.origin(run_dir) or str(run_dir)


def check_writable(history: Path | str) -> None:
    """On object storage, fail before any work when the history cannot be written (no bucket, a
    credential the store refuses): one small object written and deleted. Local folders need none."""
    if is_uri(history):
        with _storage_errors():
            run_store.check_writable(str(history))


def create_run_dir(history: Path | str, wanted_id: str) -> Path:
    """A new, empty run folder; a second run with the same id in the same second gets ``-2``, ``-3``...
    On object storage, the run's working copy (:mod:`audit.run_store`)."""
    if is_uri(history):
        with _storage_errors():
            return run_store.claim_run(str(history), wanted_id)
    history.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        candidate = history / (wanted_id if attempt == 1 else f"{wanted_id}-{attempt}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise HistoryError(f"cannot create a run folder for {wanted_id} in {history}")


def is_run(path: Path | str) -> bool:
    if is_uri(path):
        with _storage_errors():
            return storage_is_file(child(str(path), RUN_FILE))
    return (Path(path) / RUN_FILE).is_file()


def resolve_run(path: Path | str) -> Path:
    """The run folder ``path`` names: a run folder itself, or a ``latest``/``baseline`` pointer.
    A run on object storage is fetched into its working copy, whose folder is returned."""
    if is_uri(path):
        return _resolve_stored(str(path).rstrip("/"))
    path = Path(path).expanduser()
    if path.is_file() and path.name in POINTERS:
        path = path.parent / path.read_text(encoding="utf-8").strip()
    path = path.resolve()
    if not path.exists():
        raise HistoryError(f"no run at {path}")
    if not is_run(path):
        raise HistoryError(f"{path} is not a run directory (no {RUN_FILE})")
    return path


def read_run_info(run_dir: Path) -> dict:
    """A run's run.json, checked to be cam-audit's: an object with a run id, a status, a config and a
    model with its classes. Anything else (cut short, another tool's file) is a one-line error."""
    path = Path(run_dir) / RUN_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HistoryError(f"{run_dir} is not a run directory (no {RUN_FILE})") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise HistoryError(f"{path} is not a cam-audit run file: {first_line(exc)}") from None
    return _checked(info, path)


def _checked(info: object, path: Path | str) -> dict:
    missing = [key for key in RUN_KEYS if not isinstance(info, dict) or key not in info]
    if not missing and not (isinstance(info["model"], dict) and isinstance(info["model"].get("classes"), list)):
        missing = ["model.classes"]
    if not missing and not isinstance(info["config"], dict):
        missing = ["config"]
    if missing:
        raise HistoryError(f"{path} is not a cam-audit run file (no {', '.join(missing)})")
    return info


def new_lease() -> dict:
    """Who is running a run: this host and process, and when it last said so (refreshed by the driver)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": _now(), "timeout_s": LEASE_TIMEOUT_S}


def liveness(info: dict, run_dir: Path | None = None, now: datetime | None = None, check_pid: bool = True) -> str:
    """``finished`` (the run recorded its end), ``live`` or ``dead`` (``running``, but its driver is gone).

    A run is dead when its driver ran on this host and its process is gone, or when its heartbeat
    is older than the lease's timeout (another host, or a process id reused). A run from before
    leases existed is judged by its run.json's modification time. Runs on object storage are
    judged by their heartbeat alone (``check_pid=False``): drivers in containers of one host may
    share a host name but not their process ids."""
    if info.get("status") != "running":
        return "finished"
    lease = info.get("lease") if isinstance(info.get("lease"), dict) else {}
    age = _age(lease.get("heartbeat"), run_dir, now)
    timeout = float(lease.get("timeout_s") or LEASE_TIMEOUT_S)
    if check_pid and lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int):
        if not _process_alive(lease["pid"]):
            return "dead"
    return "dead" if age is None or age > timeout else "live"


def still_running(info: dict, run_id: str) -> str:
    return f"run {run_id} is still running ({lease_note(info)}); wait for it, or stop its driver first"


def take_over(location: str, lease: dict) -> Path:
    """A run on object storage that a driver resumes: refused while it is live; else its run.json
    on the store is marked ``running`` under ``lease`` first (so that no ``--keep`` deletes it from
    now on), then the run is fetched into its working copy."""
    with _storage_errors():
        history, run, info = _stored_run(location)
        if _stored_liveness(info) == "live":
            raise HistoryError(still_running(info, run))
        run_store.write_json(child(history, f"{run}/{RUN_FILE}"), {**info, "status": "running", "lease": lease})
        return run_store.fetch(child(history, run))


def lease_note(info: dict) -> str:
    """``pid 4242 on host-a, heartbeat 2026-12-01T10:00:00+00:00``: who held a run, and when last."""
    lease = info.get("lease") if isinstance(info.get("lease"), dict) else {}
    if not lease:
        return "no lease recorded"
    return f"pid {lease.get('pid')} on {lease.get('host')}, last heartbeat {lease.get('heartbeat')}"


def _age(heartbeat: object, run_dir: Path | None, now: datetime | None) -> float | None:
    now = now or datetime.now(timezone.utc)
    try:
        last = datetime.fromisoformat(str(heartbeat)) if heartbeat else None
    except ValueError:
        last = None
    if last is None and run_dir is not None:
        try:
            last = datetime.fromtimestamp((Path(run_dir) / RUN_FILE).stat().st_mtime, timezone.utc)
        except OSError:
            return None
    if last is None:
        return None
    if last.tzinfo is None:
        last = last.replace(tzinfo=timezone.utc)
    return (now - last).total_seconds()


def _process_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def pointed(history: Path, pointer: str) -> Path | None:
    """The run a pointer names, or None when there is no pointer or its run is gone."""
    link = history / pointer
    if not (link.is_symlink() or link.is_file()):
        return None
    try:
        return resolve_run(link)
    except HistoryError:
        return None


def point(history: Path | str, pointer: str, run_dir: Path) -> Path | str:
    """Make ``history/pointer`` name ``run_dir`` (a run of this history), atomically."""
    if is_uri(history):
        if history_of(run_dir) != history:
            raise HistoryError(f"{location(run_dir)} is not a run of {history}")
        with _storage_errors():
            return run_store.write_pointer(str(history), pointer, Path(run_dir).name)
    run_dir = Path(run_dir).resolve()
    if run_dir.parent != Path(history).resolve():
        raise HistoryError(f"{run_dir} is not a run of {history}")
    link = history / pointer
    partial = history / f".{pointer}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        partial.symlink_to(run_dir.name, target_is_directory=True)
    except OSError as exc:
        if exc.errno not in NO_SYMLINKS:
            raise
        partial.write_text(run_dir.name + "\n", encoding="utf-8")
    os.replace(partial, link)
    return link


def pin_baseline(location: Path | str) -> Path | str:
    """Point its history's ``baseline`` at the run ``location`` names (a run folder or URI, or a
    pointer); returns the pointer. On object storage only the run's run.json is read."""
    if not is_uri(location):
        run_dir = resolve_run(location)
        read_run_info(run_dir)  # a run of ours, not a folder that happens to hold a run.json
        return point(run_dir.parent, BASELINE, run_dir)
    with _storage_errors():
        history, run, _ = _stored_run(str(location))
        return run_store.write_pointer(history, BASELINE, run)


def pointer_exists(location: Path | str) -> bool:
    """Whether a ``latest``/``baseline`` pointer has been set (its run may since be gone: resolving
    it then fails, so a gate never passes silently without its baseline)."""
    if is_uri(location):
        history, pointer = str(location).rstrip("/").rsplit("/", 1)
        with _storage_errors():
            if storage_is_file(child(history, pointer)):
                return True
            return pointer == LATEST and _stored_pointer(history, pointer) is not None
    return Path(location).exists() or Path(location).is_symlink()


def mark_latest(run_dir: Path) -> None:
    """Point ``latest`` at a run that completed, unless a newer run already holds it."""
    uri = run_store.origin(run_dir)
    if uri:
        history, run = uri.rsplit("/", 1)
        with _storage_errors():
            current = _stored_pointer(history, LATEST)
            if current is None or _order_id(current) <= _order_id(run):
                run_store.write_pointer(history, LATEST, run)
        return
    history = run_dir.parent
    with _locked(history):
        current = pointed(history, LATEST)
        if current is None or _order(current) <= _order(run_dir):
            point(history, LATEST, run_dir)


def runs(history: Path) -> list[Path]:
    """The run folders of a history, oldest first."""
    if not history.is_dir():
        return []
    return sorted((p for p in history.iterdir() if p.is_dir() and not p.is_symlink() and is_run(p)), key=_order)


def prune(history: Path | str, keep: int, protect: tuple[Path | str | None, ...] = ()) -> list[Path | str]:
    """Delete the runs older than the newest ``keep``; returns what was deleted.

    Never deleted: the runs that a pointer or ``protect`` names, live runs (another job may be
    writing them) and the baselines those live runs compare with. A run whose driver died (see
    :func:`liveness`) is pruned like a finished one."""
    if is_uri(history):
        with _storage_errors():
            return _prune_stored(str(history), keep, protect)
    with _locked(history):
        protected = {Path(p).resolve() for p in protect if p and not is_uri(p)}
        protected |= {run for run in (pointed(history, p) for p in POINTERS) if run is not None}
        candidates = runs(history)
        infos = {run: _info(run) for run in candidates}
        running = {run for run, info in infos.items() if liveness(info, run) == "live"}
        for run in running:
            baseline = (infos[run].get("config") or {}).get("baseline")
            if baseline and not is_uri(baseline):
                protected.add(Path(baseline).resolve())
        deleted = []
        for run in candidates[:-keep] if keep else candidates:
            if run.resolve() in protected or run in running:
                continue
            shutil.rmtree(run, ignore_errors=True)
            deleted.append(run)
        return deleted


@contextmanager
def _locked(history: Path) -> Iterator[None]:
    """One process at a time moves pointers or deletes runs in a history."""
    history.mkdir(parents=True, exist_ok=True)
    with open(history / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _info(run: Path) -> dict:
    try:
        return json.loads((run / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _order(run: Path) -> tuple[str, int]:
    return _order_id(run.name)


def _order_id(run_id: str) -> tuple[str, int]:
    """By id; ``-2`` suffixes (same second, same hash) after their first."""
    base, _, suffix = run_id.rpartition("-")
    return (base, int(suffix)) if suffix.isdigit() and len(suffix) < 4 else (run_id, 1)


# Histories on object storage (no lock: see audit.run_store)


def _resolve_stored(uri: str) -> Path:
    history, name = uri.rsplit("/", 1)
    with _storage_errors():
        run = _stored_pointer(history, name) if name in POINTERS else name
        if run is None:
            raise HistoryError(f"no run at {uri}")
        return run_store.fetch(child(history, run))  # which fails where there is no run.json


def _stored_run(location: str) -> tuple[str, str, dict]:
    """The history, id and checked run.json of the stored run ``location`` names (a run or a
    pointer), read without fetching the run."""
    history, name = location.rstrip("/").rsplit("/", 1)
    run = _stored_pointer(history, name) if name in POINTERS else name
    info = _stored_info(history, run) if run else {}
    if info == {}:
        raise HistoryError(f"no run at {location}")
    return history, run, _checked(info, f"{child(history, run)}/{RUN_FILE}")


def _stored_pointer(history: str, pointer: str) -> str | None:
    """The run a pointer names as readers see it: ``latest`` is the newest complete run no older
    than the one its file names (two runs finishing together may leave the file a step behind)."""
    named = run_store.read_pointer(history, pointer)
    ids = sorted(run_store.run_ids(history), key=_order_id)
    if pointer == LATEST:
        for run in reversed(ids):
            if named is not None and _order_id(run) <= _order_id(named):
                break
            if (_stored_info(history, run) or {}).get("status") == "complete":
                return run
    return named if named in ids else None


def _prune_stored(history: str, keep: int, protect: tuple[Path | str | None, ...]) -> list[str]:
    """Without a lock: each run is judged by its own run.json, read again just before it is
    deleted; a run.json that cannot be parsed keeps its run, and a store that does not answer
    stops the pruning (a StorageError) rather than passing for a finished run."""
    ids = sorted(run_store.run_ids(history), key=_order_id)
    protected = {_same(location(p) if isinstance(p, Path) else str(p)) for p in protect if p}
    protected |= {_same(child(history, run)) for run in (_stored_pointer(history, p) for p in POINTERS) if run}
    infos = {run: _stored_info(history, run) for run in ids}
    running = {run for run, info in infos.items() if info is None or _stored_liveness(info) == "live"}
    protected |= {_same(str((infos[run] or {}).get("config", {}).get("baseline") or "")) for run in running}
    deleted = []
    for run in ids[:-keep] if keep else ids:
        if _same(child(history, run)) in protected or run in running:
            continue
        now = _stored_info(history, run)  # a resume may have taken the run over since
        if now is None or _stored_liveness(now) == "live":
            continue
        run_store.delete_run(child(history, run))
        deleted.append(child(history, run))
    return deleted


def _stored_liveness(info: dict) -> str:
    return liveness(info, check_pid=False)


def _same(uri: str) -> str:
    """A URI spelled one way: no ``.``, ``//`` or trailing ``/`` in its path."""
    parts = urlsplit(uri.rstrip("/"))
    return urlunsplit(parts._replace(path=posixpath.normpath(parts.path or "/"))) if uri else ""


def _stored_info(history: str, run: str) -> dict | None:
    """A stored run's run.json; ``{}`` when it is gone, None when it cannot be parsed."""
    location = child(history, f"{run}/{RUN_FILE}")
    try:
        info = json.loads(storage_read(location))
    except ValueError:
        return None
    except StorageError:
        if storage_is_file(location):
            raise  # there, but unreadable now: stop rather than guess
        return {}
    return info if isinstance(info, dict) else None


@contextmanager
def _storage_errors() -> Iterator[None]:
    """A store that cannot be reached, or refuses, is a one-line history error."""
    try:
        yield
    except StorageError as exc:
        raise HistoryError(str(exc)) from None
