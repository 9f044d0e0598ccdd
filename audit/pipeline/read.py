"""The read stage of the Ray Data job (CPU tasks): bytes and headers, masks as bits.

Light by design: it imports no torch, so a read task's worker starts in a fraction of a second
and the first batch is read while the explain actors load their model.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from audit.data.decode import JPEG, PIXELS, DecodeError, decode_image, decode_mask, read_header, resize_mask, resize_rgb
from audit.data.mask_cache import MaskCache, cache_folder
from audit.data.storage import StorageError, read_bytes


def read_batch(batch: dict[str, np.ndarray], input_size: tuple[int, int], masks: str) -> dict[str, np.ndarray]:
    """Read each image's bytes and header, and its mask at ``input_size``; failures become reasons.

    What leaves is small and cheap to make: a baseline JPEG's encoded bytes (decoded on the
    explain actor's device, :mod:`audit.data.device_decode`), other images decoded here and
    resized without cropping; a mask as one bit per pixel, from the mask cache
    (:mod:`audit.data.mask_cache`) when this dataset version was read before. Decompression
    bombs are refused from the header, before any pixel is decoded.
    """
    n = len(batch["image_id"])
    cache = MaskCache(cache_folder(), input_size)
    payload = np.full(n, b"", dtype=object)
    kind = np.full(n, "", dtype=object)
    bits = np.full(n, b"", dtype=object)
    source = np.full(n, "none", dtype=object)
    # "" rather than None: a column of nothing but nulls does not survive Ray's Arrow round trip as None
    stage = np.full(n, "", dtype=object)
    error = np.full(n, "", dtype=object)
    for i in range(n):
        path = batch["path"][i]
        try:
            data = _read(path)
            header = read_header(data)
            pixels = None if header.device_decodable else resize_rgb(decode_image(data), input_size)
        except DecodeError as exc:
            stage[i], error[i] = "decode", str(exc)
            continue
        payload[i], kind[i] = (data, JPEG) if pixels is None else (pixels.tobytes(), PIXELS)
        mask_path = batch["mask_path"][i]  # a str, or None: the Manifest's one form of a missing mask
        try:
            if mask_path and masks in ("auto", "provided"):
                mask = cache.provided(mask_path, header.size, partial(_mask, mask_path, header.size, input_size))
                source[i] = "provided"
            elif masks == "estimate" or (masks == "auto" and not mask_path):
                mask = cache.estimated(data, partial(_estimate, data, pixels, input_size))
                source[i] = "estimated"
        except (DecodeError, StorageError) as exc:
            stage[i], error[i] = _mask_failure(data, pixels, exc)
            continue
        if source[i] != "none":
            bits[i] = np.packbits(mask).tobytes()
    out = dict(batch)
    out.update(
        payload=payload,
        payload_kind=kind,
        mask_bits=bits,
        mask_source=source,
        decode_stage=stage,
        decode_error=error,
    )
    return out


def unpack_masks(bits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, h, w) bool from one packed bit string per row ("" where a row has no mask)."""
    h, w = size
    masks = np.zeros((len(bits), h, w), dtype=bool)
    for i, packed in enumerate(bits):
        if packed:
            masks[i] = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=h * w).reshape(h, w)
    return masks


def _read(location: str) -> bytes:
    """The file's bytes; an empty file is refused by the decoder's header check."""
    try:
        return read_bytes(location)
    except StorageError as exc:
        raise DecodeError(str(exc)) from exc


def _mask(location: str, image_size: tuple[int, int], input_size: tuple[int, int]) -> np.ndarray:
    return resize_mask(decode_mask(_read(location), image_size), input_size)


def _mask_failure(data: bytes, pixels: np.ndarray | None, exc: Exception) -> tuple[str, str]:
    """The stage and reason of a row whose mask failed. The image comes first, as it did when
    the read stage decoded every image: a JPEG that Pillow cannot decode either is a decode error."""
    if pixels is None:
        try:
            decode_image(data)
        except DecodeError as image_error:
            return "decode", str(image_error)
    return "mask", str(exc)


def _estimate(data: bytes, pixels: np.ndarray | None, input_size: tuple[int, int]) -> np.ndarray:
    """The estimated lesion mask, always on Pillow's pixels: a cached estimate equals a fresh one."""
    from audit.data.masks import estimate_lesion_mask  # scikit-image: imported where it is needed

    return estimate_lesion_mask(resize_rgb(decode_image(data), input_size) if pixels is None else pixels)
