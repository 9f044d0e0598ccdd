"""Decode images and masks defensively: every failure is a :class:`DecodeError` with a reason.

* Images of any mode come back as RGB uint8 (H, W, 3): grayscale is replicated, CMYK and
  palette images are converted, alpha is dropped (the colour channels are kept as stored),
  16-bit images are scaled to 8 bits by their full range (65535 -> 255), not clipped.
* The header is read first: an image with more than ``max_pixels`` pixels is refused before
  any pixel is decoded (decompression bombs).
* Truncated, zero-byte, corrupt and non-image files fail with a one-line reason.
* Masks: any nonzero pixel is object. A mask whose size differs from its image's is resized
  with nearest-neighbour when the aspect ratios agree within 2% (a mask saved at another
  resolution); otherwise it is refused, since it cannot belong to that image.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from audit.data.storage import StorageError, is_uri, read_bytes

DEFAULT_MAX_PIXELS = 40_000_000  # 8x a 24-megapixel photo; HAM10000 images have 270,000
ASPECT_TOLERANCE = 0.02
JPEG_END = b"\xff\xd9"  # the end-of-image marker
# The read stage's two payloads: a JPEG's bytes for the device decoder, or RGB pixels at the input size.
JPEG = "jpeg"
PIXELS = "pixels"


class DecodeError(Exception):
    """An image or mask that cannot be used, with a one-line reason."""


def decode_image(source: str | os.PathLike | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """RGB uint8 array (H, W, 3) from a path, a URI (:mod:`audit.data.storage`) or encoded bytes."""
    with _open(source, max_pixels) as image:
        return _to_rgb(image)


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 resized to ``size`` = (h, w), bilinear, without cropping: a crop could cut away
    exactly the corner where a shortcut sits."""
    h, w = size
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool resized to ``size`` = (h, w) with nearest-neighbour (a mask stays a mask)."""
    h, w = size
    return np.asarray(Image.fromarray(mask).resize((w, h), Image.Resampling.NEAREST), dtype=bool)


def decode_mask(
    source: str | os.PathLike | bytes, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Bool array (H, W) for an image of ``size`` = (H, W); nonzero pixels are the object."""
    with _open(source, max_pixels) as image:
        mask = _to_gray(image) > 0
    if mask.shape == tuple(size):
        return mask
    (mh, mw), (h, w) = mask.shape, size
    if abs((mw / mh) / (w / h) - 1) > ASPECT_TOLERANCE:
        raise DecodeError(f"mask is {mw}x{mh} but its image is {w}x{h}: different aspect ratio")
    resized = Image.fromarray(mask).resize((w, h), Image.Resampling.NEAREST)
    return np.asarray(resized, dtype=bool)


def image_size(source: str | os.PathLike | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(H, W) from the header only, with the same checks as :func:`decode_image` before decoding."""
    with _open(source, max_pixels) as image:
        width, height = image.size
    return height, width


@dataclass(frozen=True)
class Header:
    """What an image's header says: its size (H, W), and whether the device decoder can take it:
    a baseline (not progressive) 8-bit colour JPEG that ends where a JPEG ends (a truncated file
    goes to Pillow, which reports it)."""

    size: tuple[int, int]
    device_decodable: bool


def read_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Header:
    """The header of encoded bytes, with the checks of :func:`decode_image` before any pixel is decoded."""
    with _open(data, max_pixels) as image:
        width, height = image.size
        baseline_jpeg = image.format == "JPEG" and image.mode == "RGB" and not image.info.get("progressive")
    return Header((height, width), baseline_jpeg and data.endswith(JPEG_END))


def _open(source: str | os.PathLike | bytes, max_pixels: int) -> Image.Image:
    if not isinstance(source, bytes) and is_uri(source):  # object storage: read through pyarrow's filesystems
        try:
            source = read_bytes(source)
        except StorageError as exc:
            raise DecodeError(str(exc)) from exc
    try:
        if isinstance(source, bytes):
            if not source:
                raise DecodeError("empty file (0 bytes)")
            image = Image.open(io.BytesIO(source))
        else:
            path = Path(source)
            if not path.is_file():
                raise DecodeError(f"file not found: {path}")
            if path.stat().st_size == 0:
                raise DecodeError("empty file (0 bytes)")
            image = Image.open(path)
    except UnidentifiedImageError as exc:
        raise DecodeError("not an image file, or a format Pillow cannot read") from exc
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"refused: {exc}") from exc
    except OSError as exc:
        raise DecodeError(f"corrupt or truncated image: {exc}") from exc
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise DecodeError(f"refused: {width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,}")
    return image


def _load(image: Image.Image) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"corrupt or truncated image: {exc}") from exc


def _to_rgb(image: Image.Image) -> np.ndarray:
    _load(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        gray = _sixteen_to_eight(np.asarray(image))
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _to_gray(image: Image.Image) -> np.ndarray:
    _load(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return np.asarray(image)
    if image.mode in ("L", "1"):
        return np.asarray(image)
    return np.asarray(image.convert("L"))


def _sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    """16-bit (or 32-bit 'I' holding 16-bit data) to uint8 by the 16-bit full range."""
    return (np.clip(values.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
