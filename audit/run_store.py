"""Runs on object storage: ``--out s3://bucket/prefix`` (or ``gs://``, ``hdfs://``, ``file://``).

The pipeline and the report work on local files: Parquet written by a temporary name and
renamed, datasets read column by column. So a run whose history is a URI is written and read
through a *working copy*, a local folder under the node's cache (``<cache>/runs/<hash of the
history>/<run id>/``) that holds the run's files and an ``.origin`` file naming the run's URI.
Each file the run writes is *published* once complete: run.json at every save (the heartbeat
included), each explanation batch as it lands, the sanity check, the report at the end; at the
end of each attempt whatever an upload missed is sent again (:func:`publish_missing`). A run
read from the store (``audit report``, ``compare``, ``baseline``, ``--resume``) is *fetched* into
its working copy first: the files it lacks or holds at another size, and every JSON file. A
resume first writes its lease into the stored run.json (:func:`audit.history.take_over`).

Histories on a store hold no lock (a store has none to take), so each operation is made safe
for two runs of one audit finishing together, given a store with strong read-after-write and
listing consistency (S3 and GCS have it):

* every write is one object PUT, so a reader sees a whole run.json or pointer, old or new;
* a run id is claimed by a claim object in its folder (:func:`claim_run`);
* a pointer is a one-line file holding a run id (a store has no symbolic links);
* ``latest`` is a hint that readers check: the run it names, or a newer *complete* run if there is
  one (a listing of the history, a check per run folder, and the run.json of the runs newer than
  the pointer's, usually none). Two runs finishing together may both read the old pointer and
  the older one write last; readers still see the newer run, and the next run to finish
  rewrites the file;
* ``baseline`` is set by a person (``audit baseline``): the last one written holds;
* ``--keep`` judges each run by its own run.json (status and the lease's heartbeat, valid across
  hosts), reads it again just before deleting, and keeps the runs the pointers name as readers
  resolve them, live runs, their baselines and runs whose run.json cannot be parsed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from audit.data import storage
from audit.data.mask_cache import cache_folder
from audit.data.storage import StorageError, child

ORIGIN_FILE = ".origin"
CLAIM_PREFIX = ".claim-"
RUN_FILE = "run.json"


def working_copy(run_uri: str) -> Path:
    """The local folder mirroring the run at ``run_uri``: ``<cache>/runs/<history hash>/<run id>``."""
    folder = _working_folder(run_uri)
    with _local_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ORIGIN_FILE).write_text(run_uri.rstrip("/") + "\n", encoding="utf-8")
    return folder


def origin(run_dir: Path) -> str | None:
    """The URI a working copy mirrors; None for a run that lives in a local folder."""
    marker = Path(run_dir) / ORIGIN_FILE
    return marker.read_text(encoding="utf-8").strip() if marker.is_file() else None


def publish(run_dir: Path, *names: str) -> None:
    """Make the store's copy of each file ``names`` (relative POSIX paths) equal the working
    copy's: uploaded when it exists locally, deleted when it does not. Nothing for a local run."""
    uri = origin(run_dir)
    if uri is None:
        return
    for name in names:
        local = Path(run_dir) / name
        if local.is_file():
            storage.write_bytes(child(uri, name), local.read_bytes())
        else:
            storage.delete(child(uri, name))


def publish_missing(run_dir: Path) -> list[str]:
    """Upload the working copy's files that the store lacks or holds at another size (an upload
    that failed, a run the store lost while it was written); returns their names."""
    uri = origin(run_dir)
    if uri is None:
        return []
    stored = storage.Listing(uri).sizes
    missing = [
        name for name, size in _local_files(Path(run_dir)).items() if stored.get(name) != size and name != RUN_FILE
    ]
    publish(run_dir, *missing, RUN_FILE)
    return missing


def fetch(run_uri: str) -> Path:
    """The run at ``run_uri`` in its working copy, brought up to date with the store: the files it
    lacks or holds at another size, and every JSON file. Local files the store does not hold are
    removed, except temporary ones (dot-files: a driver on this node may be writing them)."""
    listing = storage.Listing(run_uri)
    if RUN_FILE not in listing.files:
        raise StorageError(f"no run at {run_uri} (no {RUN_FILE})")
    folder = working_copy(run_uri)
    with _local_errors(folder):
        for name, size in listing.sizes.items():
            local = folder / name
            if local.is_file() and local.stat().st_size == size and not name.endswith(".json"):
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            partial = local.with_name(f".{local.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.fetch")
            partial.write_bytes(storage.read_bytes(listing.location(name)))
            partial.replace(local)
        for name in set(_local_files(folder)) - listing.files:
            (folder / name).unlink(missing_ok=True)  # gone from the store (pruned batches, a report removed)
    return folder


def claim_run(history: str, wanted_id: str) -> Path:
    """A new run's working copy: the id, or ``-2``, ``-3``... when a run holds it already.

    Two drivers can want the same id (the same computation started in the same second), and a
    store has no ``mkdir`` that fails for the second one. So each writes a claim object in the
    run's folder, then lists the folder: a driver that sees any claim but its own gives the id
    up. Whichever wrote second lists after both claims exist, so at most one keeps it (both may
    give it up, and try the next)."""
    taken = set(run_ids(history, with_run_file=False))
    for attempt in range(1, 1000):
        candidate = wanted_id if attempt == 1 else f"{wanted_id}-{attempt}"
        if candidate in taken:
            continue
        claim = f"{CLAIM_PREFIX}{uuid.uuid4().hex}"
        storage.write_bytes(child(history, f"{candidate}/{claim}"), b"")
        if set(storage.Listing(child(history, candidate)).files) != {claim}:
            continue
        stale = _working_folder(child(history, candidate))
        shutil.rmtree(stale, ignore_errors=True)  # a copy of a run id the store no longer holds
        return working_copy(child(history, candidate))
    raise StorageError(f"cannot create a run folder for {wanted_id} in {history}")


def run_ids(history: str, with_run_file: bool = True) -> list[str]:
    """The ids of the runs in a history (folders holding a run.json), unsorted."""
    names = storage.folders(history)
    if not with_run_file:
        return names
    found = storage.are_files([child(history, f"{name}/{RUN_FILE}") for name in names])
    return [name for name, is_run in zip(names, found) if is_run]


def read_pointer(history: str, pointer: str) -> str | None:
    """The run id a pointer file holds, or None when there is none."""
    try:
        return storage.read_bytes(child(history, pointer)).decode("utf-8").strip() or None
    except StorageError:
        if storage.is_file(child(history, pointer)):
            raise
        return None


def write_pointer(history: str, pointer: str, run_id: str) -> str:
    location = child(history, pointer)
    storage.write_bytes(location, (run_id + "\n").encode("utf-8"))
    return location


def write_json(location: str, value: dict) -> None:
    storage.write_bytes(location, json.dumps(value, indent=2, default=str).encode("utf-8"))


def check_writable(history: str) -> None:
    probe = child(history, f".write-check-{uuid.uuid4().hex[:12]}")
    storage.write_bytes(probe, b"")
    storage.delete(probe)


def delete_run(run_uri: str) -> None:
    """The run's run.json first (so that it is no run any more, even if the rest is cut short),
    then its other objects, then its working copy on this node."""
    storage.delete(child(run_uri, RUN_FILE))
    storage.delete(run_uri, folder=True)
    shutil.rmtree(_working_folder(run_uri), ignore_errors=True)


def _working_folder(run_uri: str) -> Path:
    history, run_id = run_uri.rstrip("/").rsplit("/", 1)
    return _working_root() / hashlib.sha256(history.encode()).hexdigest()[:16] / run_id


def _local_files(folder: Path) -> dict[str, int]:
    """A working copy's files by relative path, with their sizes; not its marker or temporary files."""
    found = {}
    for path in folder.rglob("*"):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and not any(part.startswith(".") for part in name.split("/")):
            found[name] = path.stat().st_size
    return found


@contextmanager
def _local_errors(folder: Path) -> Iterator[None]:
    """A working copy that cannot be written (a full disk, a read-only home) is a one-line error."""
    try:
        yield
    except OSError as exc:
        raise StorageError(
            f"cannot write the working copy {folder}: {exc.strerror or exc} (set CAM_AUDIT_CACHE to a writable folder)"
        ) from exc


def _working_root() -> Path:
    folder = cache_folder("runs")
    if folder is None:  # the cache is off: working copies last as long as the machine's temp folder
        folder = Path(tempfile.gettempdir()) / "cam-audit-runs"
    return folder
