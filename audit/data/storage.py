"""Read files by path or URI through pyarrow's filesystems.

A location is a local path or a URI that pyarrow resolves (``file://``, ``s3://``, ``gs://``,
``hdfs://``): ``pyarrow.fs.FileSystem.from_uri``. Credentials come from each store's standard
environment (``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS``...), never from a config. One
filesystem object is kept per scheme and authority in each process, so a read task does not
reconnect per file.

Every failure is a :class:`StorageError` with a one-line reason.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

import pyarrow.fs as pafs

from audit.errors import AuditError, first_line

OBJECT_STORES = ("s3", "gs", "gcs")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class StorageError(AuditError):
    """A file that cannot be read, with a one-line reason."""


@dataclass(frozen=True)
class Stamp:
    """What identifies a file's version without reading it: its size and modification time."""

    size: int
    mtime_ns: int


def is_uri(location: str | os.PathLike) -> bool:
    return bool(_URI.match(str(location)))


def uri_parent(uri: str) -> str:
    """The folder a URI's file is in: ``s3://bucket/ds/manifest.csv`` -> ``s3://bucket/ds``."""
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(path=posixpath.dirname(parts.path)))


def uri_inside(root: str, candidate: str) -> str | None:
    """``candidate`` (a URI, or a path relative to the URI ``root``) as a URI, or None when it lies
    outside ``root`` (another store, or ``..`` out of it). Query options (an endpoint) follow the root."""
    base = urlsplit(root)
    if is_uri(candidate):
        found = urlsplit(candidate)
        if (found.scheme.lower(), found.netloc) != (base.scheme.lower(), base.netloc):
            return None
        path = posixpath.normpath(found.path or "/")
    else:
        if candidate.startswith("/"):
            return None  # a local absolute path is on no store
        path = posixpath.normpath(posixpath.join(base.path or "/", candidate))
    top = posixpath.normpath(base.path or "/")
    if path != top and not path.startswith(top.rstrip("/") + "/"):
        return None
    return urlunsplit(base._replace(path=path))


def read_bytes(location: str | os.PathLike) -> bytes:
    """The file's whole content."""
    fs, path = _resolve(location)
    try:
        with fs.open_input_file(path) as stream:
            return stream.read()
    except FileNotFoundError as exc:
        raise StorageError(f"file not found: {location}") from exc
    except OSError as exc:
        raise StorageError(_reason(location, exc)) from exc


def stamp(location: str | os.PathLike) -> Stamp:
    """Size and modification time (nanoseconds; 0 where the store keeps none)."""
    fs, path = _resolve(location)
    try:
        info = fs.get_file_info(path)
    except OSError as exc:
        raise StorageError(_reason(location, exc)) from exc
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"file not found: {location}")
    if info.type != pafs.FileType.File:
        raise StorageError(f"not a file: {location}")
    return Stamp(int(info.size or 0), int(info.mtime_ns or 0))


def write_bytes(location: str, data: bytes) -> None:
    """Write a whole file; on object storage one PUT, so readers see the old object or the new one.
    On a filesystem (local, ``file://``, ``hdfs://``) its folder is made first."""
    fs, path = _resolve(location)
    try:
        if not is_uri(location) or urlsplit(str(location)).scheme.lower() not in OBJECT_STORES:
            fs.create_dir(posixpath.dirname(path), recursive=True)
        with fs.open_output_stream(path) as stream:
            stream.write(data)
    except OSError as exc:
        raise StorageError(f"cannot write {location}: {first_line(exc)}") from exc


def delete(location: str, folder: bool = False) -> None:
    """Delete a file (or a folder and all under it, in no set order); one that is gone is no error."""
    fs, path = _resolve(location)
    try:
        if folder:
            fs.delete_dir_contents(path, missing_dir_ok=True)
            if fs.get_file_info(path).type == pafs.FileType.Directory:
                fs.delete_dir(path)
        elif fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)
    except OSError as exc:
        raise StorageError(f"cannot delete {location}: {first_line(exc)}") from exc


def is_file(location: str) -> bool:
    fs, path = _resolve(location)
    try:
        return fs.get_file_info(path).type == pafs.FileType.File
    except OSError as exc:
        raise StorageError(_reason(location, exc)) from exc


def folders(location: str) -> list[str]:
    """The names of the folders right under ``location`` (key prefixes on object storage)."""
    return [info.base_name for info in _entries(location) if info.type == pafs.FileType.Directory]


def are_files(locations: list[str]) -> list[bool]:
    """Whether each location is a file (locations of one store; one request each on object storage)."""
    if not locations:
        return []
    fs, _ = _resolve(locations[0])
    try:
        infos = fs.get_file_info([_resolve(location)[1] for location in locations])
    except OSError as exc:
        raise StorageError(_reason(locations[0], exc)) from exc
    return [info.type == pafs.FileType.File for info in infos]


def child(uri: str, name: str) -> str:
    """``name`` (a relative POSIX path) under the URI ``uri``."""
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(path=posixpath.join(parts.path.rstrip("/") or "/", name)))


class Listing:
    """The files under a root on object storage, by relative POSIX path, from one recursive listing
    (a store has no folders to walk, only keys to list)."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        fs, path = _resolve(self.root)
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        except OSError as exc:
            raise StorageError(_reason(root, exc)) from exc
        prefix = path.rstrip("/") + "/"
        self.sizes = {
            info.path[len(prefix) :]: int(info.size or 0) for info in infos if info.type == pafs.FileType.File
        }
        self.files = set(self.sizes)

    def location(self, relative: str) -> str:
        return child(self.root, relative)

    def is_file(self, relative: str) -> bool:
        return relative in self.files

    def folders(self) -> list[str]:
        """The top-level folders (those holding at least one file)."""
        return sorted({name.split("/", 1)[0] for name in self.files if "/" in name})

    def files_in(self, folder: str, suffixes: tuple[str, ...], recursive: bool = False) -> list[str]:
        """Relative paths of the files with one of ``suffixes`` in ``folder`` ("." is the root)."""
        prefix = "" if folder in (".", "") else folder.strip("/") + "/"
        found = []
        for name in sorted(self.files):
            rest = name[len(prefix) :] if name.startswith(prefix) else None
            if rest and (recursive or "/" not in rest) and rest.lower().endswith(suffixes):
                found.append(name)
        return found


def file_sizes(locations: list[str]) -> dict[str, int]:
    """Size of each file that exists, by location: one listing per folder on object storage (not
    one request per object), a stat per file locally."""
    sizes: dict[str, int] = {}
    by_folder: dict[str, list[str]] = {}
    for location in locations:
        if is_uri(location):
            by_folder.setdefault(uri_parent(location), []).append(location)
        elif os.path.isfile(location):
            sizes[location] = os.path.getsize(location)
    for folder, inside in by_folder.items():
        found = {info.base_name: info.size for info in _entries(folder) if info.type == pafs.FileType.File}
        for location in inside:
            name = unquote(urlsplit(location).path.rsplit("/", 1)[-1])
            if name in found:
                sizes[location] = int(found[name])
    return sizes


def _entries(location: str) -> list[pafs.FileInfo]:
    """What lies right under ``location``: one listing."""
    fs, path = _resolve(location)
    try:
        return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as exc:
        raise StorageError(f"cannot list {location}: {first_line(exc)}") from exc


def _resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    text = os.fspath(location)
    if not is_uri(text):
        return _LOCAL, os.path.abspath(text)
    parts = urlsplit(text)
    key = (parts.scheme.lower(), parts.netloc, parts.query)
    try:
        if key not in _FILESYSTEMS:
            _FILESYSTEMS[key] = pafs.FileSystem.from_uri(text)[0]
    except (OSError, ValueError) as exc:
        raise StorageError(_reason(location, exc)) from exc
    # Object stores name a file by bucket and key; a filesystem (file, hdfs) by its path alone.
    inside = parts.netloc + parts.path if key[0] in OBJECT_STORES else parts.path
    return _FILESYSTEMS[key], unquote(inside)


_LOCAL = pafs.LocalFileSystem()
_FILESYSTEMS: dict[tuple[str, str, str], pafs.FileSystem] = {}  # one per store: scheme, bucket or host, options


def _reason(location: str | os.PathLike, exc: BaseException) -> str:
    return f"cannot read {location}: {first_line(exc)}"
