"""Bad and unusual image files: each one a clear outcome, never a crash."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from audit.data.decode import DecodeError, decode_image, decode_mask, image_size


def _save(tmp_path, name, image, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "PNG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("RGB", "JPEG"), ("LA", "PNG"), ("1", "PNG")],
)
def test_every_mode_becomes_rgb_uint8(tmp_path, mode, fmt):
    image = Image.new(mode, (12, 8), color=0 if mode == "1" else None)
    path = _save(tmp_path, f"x.{fmt.lower()}", image, format=fmt)
    rgb = decode_image(path)
    assert rgb.shape == (8, 12, 3) and rgb.dtype == np.uint8


def test_grayscale_is_replicated(tmp_path):
    path = _save(tmp_path, "g.png", Image.new("L", (4, 4), color=77))
    assert (decode_image(path) == 77).all()


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (4, 4), color=1)
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    path = _save(tmp_path, "p.png", image, transparency=0)
    assert decode_image(path)[0, 0].tolist() == [200, 10, 10]


def test_cmyk_is_converted(tmp_path):
    path = _save(tmp_path, "c.jpg", Image.new("CMYK", (8, 8), color=(0, 255, 255, 0)), quality=100)
    red = decode_image(path)[4, 4]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    path = _save(tmp_path, "16.png", Image.fromarray(values))
    assert decode_image(path)[0, :, 0].tolist() == [0, 1, 128, 255]


def test_rgba_keeps_colour_channels(tmp_path):
    path = _save(tmp_path, "a.png", Image.new("RGBA", (3, 3), color=(10, 20, 30, 0)))
    assert decode_image(path)[1, 1].tolist() == [10, 20, 30]


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(DecodeError, match="empty file"):
        decode_image(path)


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image")
    with pytest.raises(DecodeError, match="not an image"):
        decode_image(path)


def test_truncated_jpeg(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert image_size(path) == (64, 64)  # the header is intact
    with pytest.raises(DecodeError, match="truncated"):
        decode_image(path)


def test_corrupt_bytes(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    middle = len(data) // 2
    data[middle : middle + 64] = b"\xff" * 64
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    with pytest.raises(DecodeError):
        decode_image(path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = _save(tmp_path, "bomb.png", Image.new("L", (4000, 3000)))
    with pytest.raises(DecodeError, match="exceeds the limit"):
        decode_image(path, max_pixels=1_000_000)
    with pytest.raises(DecodeError, match="exceeds the limit"):
        image_size(path, max_pixels=1_000_000)


def test_missing_file(tmp_path):
    with pytest.raises(DecodeError, match="file not found"):
        decode_image(tmp_path / "nope.jpg")


def test_bytes_input():
    buffer = io.BytesIO()
    Image.new("RGB", (5, 4), color=(1, 2, 3)).save(buffer, "PNG")
    assert decode_image(buffer.getvalue()).shape == (4, 5, 3)


def test_mask_any_nonzero_is_lesion(tmp_path):
    values = np.array([[0, 1], [128, 255]], dtype=np.uint8)
    path = _save(tmp_path, "m.png", Image.fromarray(values))
    assert decode_mask(path, (2, 2)).tolist() == [[False, True], [True, True]]


def test_mask_at_another_resolution_is_resized_nearest(tmp_path):
    small = np.zeros((45, 60), dtype=np.uint8)
    small[:, :30] = 255
    path = _save(tmp_path, "m.png", Image.fromarray(small))
    mask = decode_mask(path, (450, 600))
    assert mask.shape == (450, 600) and mask[:, :300].all() and not mask[:, 300:].any()


def test_mask_of_another_shape_is_refused(tmp_path):
    path = _save(tmp_path, "m.png", Image.new("L", (100, 100)))
    with pytest.raises(DecodeError, match="aspect ratio"):
        decode_mask(path, (450, 600))
