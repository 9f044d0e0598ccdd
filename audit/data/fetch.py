"""``audit fetch ham10000``: download the public release from Harvard Dataverse, safely re-runnable.

The file list (ids, sizes, MD5 checksums) comes from the Dataverse API for the dataset's DOI,
so nothing here goes stale when the release is re-versioned. Each file is streamed to
``<name>.part``, resumed with an HTTP Range request when the connection drops, checked against
its size and MD5, and only then renamed into place; archives are extracted (refusing members
that would land outside the target) into a temporary folder renamed when complete. A second run
finds everything verified and does nothing.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from audit.errors import AuditError

DATAVERSE_URL = "https://dataverse.harvard.edu"
HAM10000_DOI = "doi:10.7910/DVN/DBW86T"
CHUNK = 1 << 20

# Dataverse label prefix -> (local file name, folder to extract into, or None)
HAM10000_FILES = {
    "HAM10000_images_part1.zip": ("HAM10000_images_part1.zip", "HAM10000_images_part1"),
    "HAM10000_images_part2.zip": ("HAM10000_images_part2.zip", "HAM10000_images_part2"),
    "HAM10000_segmentations_lesion_tschandl.zip": (
        "HAM10000_segmentations_lesion_tschandl.zip",
        "HAM10000_segmentations_lesion_tschandl",
    ),
    "HAM10000_metadata": ("HAM10000_metadata.csv", None),
}


class FetchError(AuditError):
    """A download that could not be completed or verified."""


@dataclass(frozen=True)
class RemoteFile:
    label: str
    file_id: int
    size: int
    md5: str | None
    tabular: bool  # ingested by Dataverse: ask for the original format


Progress = Callable[[str, int, int], None]  # (file name, bytes done, bytes total)


def default_data_dir(dataset: str) -> Path:
    """``$AUDIT_DATA_DIR/<dataset>``, else ``$XDG_CACHE_HOME/cam-audit/<dataset>`` (``~/.cache``)."""
    if os.environ.get("AUDIT_DATA_DIR"):
        return Path(os.environ["AUDIT_DATA_DIR"]).expanduser() / dataset
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "cam-audit" / dataset


def list_release(base_url: str = DATAVERSE_URL, doi: str = HAM10000_DOI, timeout: float = 60) -> list[RemoteFile]:
    """The files of the dataset's latest version, from the Dataverse API."""
    query = urllib.parse.urlencode({"persistentId": doi})
    url = f"{base_url}/api/datasets/:persistentId/?{query}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            payload = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise FetchError(f"cannot read the file list of {doi} from {base_url}: {exc}") from exc
    files = []
    for entry in payload.get("data", {}).get("latestVersion", {}).get("files", []):
        data = entry.get("dataFile", {})
        tabular = bool(data.get("originalFileFormat"))
        size = data.get("originalFileSize") if tabular and data.get("originalFileSize") else data.get("filesize")
        md5 = data.get("md5") or (data.get("checksum") or {}).get("value")
        files.append(RemoteFile(entry.get("label", data.get("filename", "")), int(data["id"]), int(size), md5, tabular))
    return files


def fetch_ham10000(
    dest: Path,
    base_url: str = DATAVERSE_URL,
    progress: Progress | None = None,
    retries: int = 5,
    timeout: float = 60,
) -> Path:
    """Download, verify and extract HAM10000 into ``dest``; return ``dest``. Safe to re-run."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    remote = list_release(base_url, HAM10000_DOI, timeout)
    for prefix, (name, folder) in HAM10000_FILES.items():
        match = next((f for f in remote if f.label.startswith(prefix)), None)
        if match is None:
            raise FetchError(f"{HAM10000_DOI} has no file named {prefix}*; the release may have changed")
        url = f"{base_url}/api/access/datafile/{match.file_id}" + ("?format=original" if match.tabular else "")
        archive = download(url, dest / name, match.size, match.md5, progress, retries, timeout)
        if folder is not None:
            extract(archive, dest / folder)
    return dest


def download(
    url: str,
    target: Path,
    size: int,
    md5: str | None,
    progress: Progress | None = None,
    retries: int = 5,
    timeout: float = 60,
) -> Path:
    """Stream ``url`` to ``target`` with resume; verify size and MD5; skip a verified file."""
    if target.is_file() and target.stat().st_size == size and _md5_ok(target, md5):
        return target
    part = target.with_name(target.name + ".part")
    for _attempt in range(retries + 1):
        done = part.stat().st_size if part.exists() else 0
        if done > size:
            part.unlink()
            done = 0
        if done < size:
            try:
                _stream(url, part, done, size, progress, timeout)
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                if isinstance(exc, urllib.error.HTTPError) and exc.code in (401, 403, 404):
                    raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
                continue  # resume from what arrived
        if part.stat().st_size == size:
            if not _md5_ok(part, md5):
                part.unlink()
                raise FetchError(
                    f"{target.name}: MD5 checksum mismatch after download; the partial file was removed, run again"
                )
            part.replace(target)
            return target
    got = part.stat().st_size if part.exists() else 0
    raise FetchError(
        f"{target.name}: download incomplete after {retries + 1} attempts ({got:,} of {size:,} bytes); "
        "run again to resume"
    )


def _stream(url: str, part: Path, done: int, size: int, progress: Progress | None, timeout: float) -> None:
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if done and response.status != 206:  # the server ignored the range: start over
            done = 0
        with open(part, "ab" if done else "wb") as out:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(part.name.removesuffix(".part"), done, size)


def _md5_ok(path: Path, md5: str | None) -> bool:
    if not md5:
        return True
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest() == md5.lower()


def extract(archive: Path, folder: Path) -> Path:
    """Extract ``archive`` into ``folder`` once; a single top-level directory inside is flattened."""
    marker = folder / ".extracted"
    if marker.is_file() and marker.read_text() == _fingerprint(archive):
        return folder
    staging = folder.with_name(folder.name + ".extracting")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            strip = _common_top(members)
            for member in members:
                relative = member.filename[len(strip) :] if strip else member.filename
                target = (staging / relative).resolve()
                if staging.resolve() not in target.parents:
                    raise FetchError(
                        f"{archive.name}: refusing member {member.filename!r}, which points outside the folder"
                    )
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out, CHUNK)
    except zipfile.BadZipFile as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise FetchError(f"{archive.name}: not a valid zip archive ({exc}); delete it and run again") from exc
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    marker.write_text(_fingerprint(archive))
    return folder


def _common_top(members: list[zipfile.ZipInfo]) -> str:
    tops = {m.filename.split("/", 1)[0] for m in members}
    if len(tops) == 1 and all("/" in m.filename for m in members):
        return tops.pop() + "/"
    return ""


def _fingerprint(archive: Path) -> str:
    stat = archive.stat()
    return f"{archive.name}:{stat.st_size}:{int(stat.st_mtime)}"
