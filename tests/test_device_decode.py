"""Bytes in, pixels on the device: the read stage's routing, the device decoder against Pillow,
the mask cache, and reading through pyarrow's filesystems."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from audit.data import mask_cache
from audit.data import masks as lesion_masks
from audit.data.decode import JPEG, PIXELS, DecodeError, decode_image, read_header, resize_rgb
from audit.data.device_decode import decode_jpegs, decode_on_device, resize_float, resize_on_device
from audit.data.synthetic import Shortcut, SyntheticSpec, generate
from audit.pipeline import read as read_stage
from audit.pipeline.read import read_batch, unpack_masks
from audit.pipeline.stages import decode_rows

SIZE = (64, 64)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Lesion photographs at a HAM-like aspect (4:3), with their masks."""
    root = generate(
        tmp_path_factory.mktemp("device") / "syn",
        SyntheticSpec(images=8, height=150, width=200, shortcuts={"df": Shortcut("ruler")}, seed=3),
        workers=1,
    )
    images = sorted((root / "HAM10000_images_part_1").glob("*.jpg"))
    masks = [root / "HAM10000_segmentations_lesion_tschandl" / f"{p.stem}_segmentation.png" for p in images]
    return images, masks


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _batch(paths, masks=None) -> dict:
    n = len(paths)
    return {
        "image_id": np.array([f"img{i}" for i in range(n)], dtype=object),
        "path": np.array([str(p) for p in paths], dtype=object),
        "mask_path": np.array([str(m) if m else None for m in (masks or [None] * n)], dtype=object),
    }


def _pillow(path_or_bytes, size=SIZE) -> np.ndarray:
    return resize_rgb(decode_image(path_or_bytes), size)


def test_device_decoder_matches_pillow_within_one_grey_level(photos):
    images, _ = photos
    data = [p.read_bytes() for p in images]
    assert all(read_header(d).device_decodable for d in data)
    decoded, errors = decode_on_device(data, [JPEG] * len(data), SIZE, "cpu")
    assert errors == {}
    ours = decoded.permute(0, 2, 3, 1).numpy().astype(int)
    theirs = np.stack([_pillow(p) for p in images]).astype(int)
    difference = np.abs(ours - theirs)
    assert difference.max() <= 1 and difference.mean() < 0.05


def test_the_float_resize_of_other_devices_is_within_one_grey_level(photos):
    images, _ = photos
    full = torch.stack(decode_jpegs([p.read_bytes() for p in images], torch.device("cpu")))
    exact, rounded = resize_on_device(full, SIZE).int(), resize_float(full, SIZE).int()
    assert (exact - rounded).abs().max() <= 1 and (exact - rounded).abs().float().mean() < 0.3


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("png", lambda rgb: _encoded(Image.fromarray(rgb), "PNG")),
        ("grayscale jpeg", lambda rgb: _encoded(Image.fromarray(rgb).convert("L"), "JPEG")),
        ("cmyk jpeg", lambda rgb: _encoded(Image.fromarray(rgb).convert("CMYK"), "JPEG")),
        ("progressive jpeg", lambda rgb: _encoded(Image.fromarray(rgb), "JPEG", progressive=True)),
        ("16-bit png", lambda rgb: _encoded(Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257), "PNG")),
        ("jpeg with bytes after its end", lambda rgb: _encoded(Image.fromarray(rgb), "JPEG") + b"\0" * 8),
    ],
)
def test_what_the_device_decoder_does_not_take_is_decoded_by_pillow_in_the_read_stage(tmp_path, name, make):
    rgb = np.random.default_rng(0).integers(0, 255, (45, 60, 3), dtype=np.uint8)
    path = tmp_path / "image"
    path.write_bytes(make(rgb))
    read = read_batch(_batch([path]), SIZE, "none")
    assert read["payload_kind"][0] == PIXELS, name
    images, _, errors = decode_rows(read, SIZE, "cpu")
    assert errors[0] == ""
    assert np.array_equal(images[0].permute(1, 2, 0).numpy(), _pillow(path)), name


def test_a_corrupt_stream_falls_back_to_pillow_without_costing_its_batch(photos):
    images, _ = photos
    good = images[0].read_bytes()
    damaged = bytearray(good)
    table = damaged.index(b"\xff\xc4")  # a Huffman table whose code counts add up to more than 256
    damaged[table + 5 : table + 21] = b"\xff" * 16
    broken = bytes(damaged)
    assert read_header(broken).device_decodable  # the header Pillow reads first is intact
    assert decode_jpegs([broken], torch.device("cpu")) == [None]
    decoded, errors = decode_on_device([good, broken, good], [JPEG] * 3, SIZE, "cpu")
    assert set(errors) == {1} and "corrupt" in errors[1]
    assert decoded[0].equal(decoded[2]) and decoded[0].float().std() > 0


@pytest.mark.parametrize("masks", ["estimate", "provided"])
def test_an_image_that_does_not_decode_is_a_decode_error_whatever_its_mask(tmp_path, photos, masks):
    """The image comes first, as when the read stage decoded every image: a JPEG whose header
    passes but whose data does not decode is a `decode` error, not a `mask` error."""
    images, _ = photos
    damaged = bytearray(images[0].read_bytes())
    table = damaged.index(b"\xff\xc4")
    damaged[table + 5 : table + 21] = b"\xff" * 16
    path = tmp_path / "damaged.jpg"
    path.write_bytes(bytes(damaged))
    read = read_batch(_batch([path], [tmp_path / "no-mask.png"]), SIZE, masks)
    assert read["decode_stage"][0] == "decode" and "corrupt" in read["decode_error"][0]


def test_bad_files_keep_their_reasons_and_stage(tmp_path, photos):
    images, _ = photos
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "cut.jpg").write_bytes(images[0].read_bytes()[:300])
    paths = [tmp_path / "empty.jpg", tmp_path / "text.jpg", tmp_path / "cut.jpg", tmp_path / "missing.jpg", images[1]]
    read = read_batch(_batch(paths), SIZE, "none")
    _, _, errors = decode_rows(read, SIZE, "cpu")
    reasons = [read["decode_error"][i] or errors[i] for i in range(len(paths))]
    for reason, expected in zip(reasons, ("empty file", "not an image", "truncated", "file not found", "")):
        assert expected in reason if expected else reason == ""
    assert list(read["decode_stage"][:4]) == ["decode", "decode", "decode", "decode"]


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (4000, 3000)).save(path)
    with pytest.raises(DecodeError, match="exceeds the limit"):
        read_header(path.read_bytes(), max_pixels=1_000_000)
    monkeypatch.setattr(read_stage, "decode_image", _never)
    monkeypatch.setattr(read_stage, "read_header", lambda data: read_header(data, max_pixels=1_000_000))
    read = read_batch(_batch([path]), SIZE, "none")
    assert read["decode_stage"][0] == "decode" and "exceeds the limit" in read["decode_error"][0]


def test_locations_may_be_file_uris(photos):
    images, masks = photos
    read = read_batch(_batch([images[0].as_uri()], [masks[0].as_uri()]), SIZE, "provided")
    assert read["decode_stage"][0] == "" and read["mask_source"][0] == "provided"
    assert read["payload"][0] == images[0].read_bytes()


def _never(*args, **kwargs):
    raise AssertionError("decoded, but should have come from the cache")


def test_masks_are_decoded_once_per_dataset_version(tmp_path, photos, monkeypatch):
    images, masks = photos
    monkeypatch.setenv(mask_cache.CACHE_ENV, str(tmp_path / "cache"))
    provided = _batch(images[:4], masks[:4])
    estimated = _batch(images[4:])
    first = read_batch(provided, SIZE, "provided"), read_batch(estimated, SIZE, "estimate")
    with monkeypatch.context() as patched:  # a nightly run of the same dataset decodes no mask
        patched.setattr(read_stage, "decode_mask", _never)
        patched.setattr(lesion_masks, "estimate_lesion_mask", _never)
        again = read_batch(provided, SIZE, "provided"), read_batch(estimated, SIZE, "estimate")
    for before, after in zip(first, again):
        assert list(after["mask_bits"]) == list(before["mask_bits"]) and all(after["mask_bits"])
    unpacked = unpack_masks(first[0]["mask_bits"], SIZE)
    assert 0 < unpacked.mean() < 1

    Image.new("L", Image.open(masks[0]).size).save(masks[0])  # the dataset changes: an empty mask
    changed = read_batch(provided, SIZE, "provided")
    assert not unpack_masks(changed["mask_bits"], SIZE)[0].any()
    assert list(changed["mask_bits"][1:]) == list(first[0]["mask_bits"][1:])


def test_the_cache_can_be_turned_off_and_survives_damage(tmp_path, photos, monkeypatch):
    images, masks = photos
    monkeypatch.setenv(mask_cache.CACHE_ENV, "off")
    assert mask_cache.cache_folder() is None
    read_batch(_batch(images[5:6], masks[5:6]), SIZE, "provided")
    monkeypatch.setenv(mask_cache.CACHE_ENV, str(tmp_path / "cache"))
    first = read_batch(_batch(images[5:6], masks[5:6]), SIZE, "provided")
    (entry,) = (tmp_path / "cache").rglob("*.bits")
    entry.write_bytes(b"\x00\x01")
    again = read_batch(_batch(images[5:6], masks[5:6]), SIZE, "provided")
    assert again["mask_bits"][0] == first["mask_bits"][0] and len(entry.read_bytes()) == SIZE[0] * SIZE[1] // 8


def test_a_missing_mask_is_a_mask_error_and_is_not_cached(tmp_path, photos, monkeypatch):
    images, _ = photos
    monkeypatch.setenv(mask_cache.CACHE_ENV, str(tmp_path / "cache"))
    read = read_batch(_batch(images[:1], [tmp_path / "gone.png"]), SIZE, "provided")
    assert read["decode_stage"][0] == "mask" and "file not found" in read["decode_error"][0]
    assert not list((tmp_path / "cache").rglob("*.bits"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvjpeg_matches_the_cpu_decoder(photos):
    images, _ = photos
    data = [p.read_bytes() for p in images]
    on_gpu, errors = decode_on_device(data, [JPEG] * len(data), SIZE, "cuda")
    on_cpu, _ = decode_on_device(data, [JPEG] * len(data), SIZE, "cpu")
    assert errors == {} and on_gpu.device.type == "cuda"
    assert (on_gpu.cpu().int() - on_cpu.int()).abs().max() <= 2  # decoders may round the IDCT differently
