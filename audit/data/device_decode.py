"""Decode and resize images on the explain actor's device, from the bytes the read stage shipped.

The read stage (:func:`audit.pipeline.read.read_batch`) sends each image as one of two payloads:

* ``jpeg``: the file's bytes, for a baseline colour JPEG (:class:`audit.data.decode.Header`).
  They are decoded here by torchvision's ``decode_jpeg`` on the device: on CUDA in one batched
  call to nvJPEG; on the CPU with libjpeg-turbo, image by image on torch's threads. Bytes it
  refuses (a corrupt stream) are decoded by Pillow (:func:`audit.data.decode.decode_image`),
  whose reason becomes the row's error;
* ``pixels``: RGB uint8 already at the input size, for everything else (PNG, grayscale, CMYK,
  16-bit, progressive or truncated JPEGs), decoded by Pillow in the read stage.

Resizing is antialiased bilinear without cropping, as :func:`audit.data.decode.resize_rgb`
(Pillow) does it: on the CPU torch's uint8 kernel, which reproduces Pillow's fixed-point
arithmetic; elsewhere in float, rounded to uint8. Both stay within one grey level of Pillow
at every pixel (``tests/test_device_decode.py``), so a map does not depend on which path an image took.

torchvision 0.29 deprecates its image codecs in favour of TorchCodec; they remain the ones that
torch>=2.11's CUDA builds ship with nvJPEG, so they are used here until they are removed.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from audit.data.decode import JPEG, PIXELS, DecodeError, decode_image, resize_rgb

# Said on every call since torchvision 0.29 (see the note above). A filter, not a
# ``catch_warnings`` block: that one swaps the process's filters, which is not thread-safe.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning
)


def decode_on_device(
    payloads: Sequence[bytes], kinds: Sequence[str], size: tuple[int, int], device: torch.device | str
) -> tuple[torch.Tensor, dict[int, str]]:
    """(N, 3, h, w) uint8 images on ``device``, and {row: reason} for rows that no decoder could read
    (their images stay zero)."""
    device = torch.device(device)
    h, w = size
    images = torch.zeros((len(payloads), 3, h, w), dtype=torch.uint8, device=device)
    errors: dict[int, str] = {}
    pixels: dict[int, np.ndarray] = {}
    jpegs = [i for i, kind in enumerate(kinds) if kind == JPEG]
    decode = _decode_on_cpu if device.type == "cpu" else _decode_batched
    for i, decoded in zip(jpegs, decode([payloads[i] for i in jpegs], size, device)):
        if decoded is not None:
            images[i] = decoded
            continue
        try:
            pixels[i] = resize_rgb(decode_image(bytes(payloads[i])), size)
        except DecodeError as exc:
            errors[i] = str(exc)
    for i, kind in enumerate(kinds):
        if kind == PIXELS:
            pixels[i] = np.frombuffer(payloads[i], dtype=np.uint8).reshape(h, w, 3)
    if pixels:
        indices = torch.tensor(list(pixels), device=device)
        stacked = torch.from_numpy(np.stack(list(pixels.values())))
        images[indices] = stacked.to(device, non_blocking=True).permute(0, 3, 1, 2)
    return images, errors


def decode_jpegs(payloads: Sequence[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """(3, H, W) uint8 per JPEG on ``device``, None for a stream the decoder refuses.

    One batched call; when it fails, each image again on its own, so one bad file costs only itself."""
    if not payloads:
        return []
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in payloads]
    try:
        return list(_decode(encoded, device))
    except Exception:  # noqa: BLE001 - any refusal sends the image to Pillow, which names the problem
        if len(encoded) == 1:
            return [None]
    return [decode_jpegs([data], device)[0] for data in payloads]


def resize_on_device(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, 3, h, w) uint8, antialiased bilinear, as Pillow's resize."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    if images.device.type == "cpu":
        return F.interpolate(images, size=size, mode="bilinear", antialias=True)
    return resize_float(images, size)


def resize_float(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The float form of :func:`resize_on_device` (devices without torch's uint8 kernel)."""
    resized = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def _decode_batched(payloads: Sequence[bytes], size: tuple[int, int], device: torch.device) -> list:
    """A GPU: one batched decode, then one resize per group of images of the same size."""
    decoded = decode_jpegs(payloads, device)
    by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
    for position, image in enumerate(decoded):
        if image is not None:
            by_shape[tuple(image.shape[-2:])].append(position)
    out: list[torch.Tensor | None] = [None] * len(payloads)
    for positions in by_shape.values():
        resized = resize_on_device(torch.stack([decoded[p] for p in positions]), size)
        for position, image in zip(positions, resized):
            out[position] = image
    return out


def _decode_on_cpu(payloads: Sequence[bytes], size: tuple[int, int], device: torch.device) -> list:
    """A CPU: each image decoded on its own (no full-size batch is copied), on as many threads as
    torch uses (libjpeg-turbo releases the GIL), then resized one by one on this thread (the resize
    has torch's threads of its own)."""
    workers = max(1, min(torch.get_num_threads(), len(payloads)))
    if workers == 1:
        decoded = [decode_jpegs([data], device)[0] for data in payloads]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            decoded = list(pool.map(lambda data: decode_jpegs([data], device)[0], payloads))
    return [None if image is None else resize_on_device(image[None], size)[0] for image in decoded]


def _decode(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    if device.type == "cuda":
        # nvJPEG writes on a stream of its own that does not wait for this one (pytorch/vision#9606)
        torch.cuda.current_stream(device).synchronize()
    return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
