"""Masks at the model's input size, decoded once per dataset version and reused by later runs.

A nightly audit of an unchanged dataset should not decode its masks again: a PNG mask costs
more to decode than the JPEG it belongs to, and an estimated mask (:mod:`audit.data.masks`)
far more. So each mask, once resized to the model's input size, is kept in a folder of small
files (one bit per pixel), named by a hash of everything it depends on:

* a provided mask: its location, its size and modification time, the image's size (the mask is
  fitted to it) and the input size; a store that keeps no modification time gets no caching of
  provided masks (an edit of the same size would go unseen);
* an estimated mask: a hash of its image's bytes (already read), the input size, and the
  estimator's source code (a changed estimator never serves an old estimate).

A file that changes gets a new key, so a stale entry is never read again; entries are small (one
bit per pixel: 6 KB at 224x224) and are not pruned (delete the folder to reclaim them). The
folder is ``$CAM_AUDIT_CACHE`` (``off`` turns the cache off), else ``$XDG_CACHE_HOME/cam-audit``,
else ``~/.cache/cam-audit``; each node of a cluster keeps its own. Entries are written to a
temporary name and renamed, so concurrent read tasks never see half a file. Failures are not
cached: a missing mask is looked for again next time.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np

from audit.data.storage import stamp

CACHE_ENV = "CAM_AUDIT_CACHE"
FORMAT = 1


def cache_folder(kind: str = "masks") -> Path | None:
    """Where cam-audit keeps ``kind`` (``masks``; ``runs``, the working copies of runs on object
    storage) on this node, or None when the cache is off."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen:
        return None if chosen.lower() in ("off", "none", "0") else Path(chosen) / kind
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cam-audit" / kind


class MaskCache:
    """Bool masks of shape ``size`` (h, w), by key; ``folder=None`` keeps nothing."""

    def __init__(self, folder: Path | None, size: tuple[int, int]) -> None:
        self.folder, self.size = folder, tuple(size)

    def provided(self, mask: str, image_size: tuple[int, int], compute: Callable[[], np.ndarray]) -> np.ndarray:
        key = self._key("provided", mask, list(image_size))
        return self._get(key, compute)

    def estimated(self, image: bytes, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The estimate for the image with these encoded bytes."""
        if self.folder is None:
            return self._get(None, compute)
        content = hashlib.sha256(image).hexdigest()
        return self._get(self._digest(["estimated", content, _estimator_digest()]), compute)

    def _key(self, kind: str, location: str, extra) -> str | None:
        if self.folder is None:
            return None
        version = stamp(location)
        if not version.mtime_ns:
            return None
        return self._digest([kind, str(location), version.size, version.mtime_ns, extra])

    def _digest(self, parts: list) -> str:
        return hashlib.sha256(json.dumps([FORMAT, *parts, list(self.size)]).encode()).hexdigest()[:32]

    def _get(self, key: str | None, compute: Callable[[], np.ndarray]) -> np.ndarray:
        if key is not None:
            found = self._read(key)
            if found is not None:
                return found
        mask = compute()
        if key is not None:
            self._write(key, mask)
        return mask

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.bits"

    def _read(self, key: str) -> np.ndarray | None:
        try:
            packed = np.frombuffer(self._path(key).read_bytes(), dtype=np.uint8)
        except OSError:
            return None
        h, w = self.size
        if packed.size != (h * w + 7) // 8:
            return None  # a damaged entry: computed again and rewritten
        return np.unpackbits(packed, count=h * w).reshape(h, w).astype(bool)

    def _write(self, key: str, mask: np.ndarray) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
            partial.write_bytes(np.packbits(mask.astype(bool)).tobytes())
            partial.replace(path)
        except OSError:
            pass  # a read-only or full disk costs speed, not results


@cache
def _estimator_digest() -> str:
    from audit.data import masks

    return hashlib.sha256(Path(masks.__file__).read_bytes()).hexdigest()[:16]
