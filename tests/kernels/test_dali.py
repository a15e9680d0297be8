"""DALI decode (+ resize) against Pillow, corrupt images in a batch, pipeline reuse."""

from __future__ import annotations

import io
import os
import time

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image, ImageOps

from medvistagym.kernels import dali

needs_dali = pytest.mark.skipif(not dali.available(), reason="NVIDIA DALI is not importable (nvidia-dali-cuda120)")

SKIMAGE_DATA = os.path.dirname(skimage.data.__file__)
# DALI's CPU decoder and Pillow both use libjpeg-turbo (default IDCT, fancy chroma upsampling):
# measured 0 levels apart on retina.jpg, rocket.jpg and re-encoded photos (4:4:4, 4:2:2, 4:2:0,
# progressive, grayscale). One level of slack for libjpeg-turbo version drift.
JPEG_TOLERANCE = 1
# DALI's antialiased cubic vs Pillow's BICUBIC on uint8 photos, 4x down to 2x up: measured mean
# |diff| <= 0.22, 99th percentile 1 level, max 9 on a few of astronaut's hard-edge pixels. Most of
# it is Pillow rounding to uint8 between its two passes (against Pillow's float mode the mean is
# <= 0.02), the rest where the two order and clamp their passes differently around overshoot.
RESIZE_MEAN, RESIZE_P99, RESIZE_MAX = 0.3, 1, 10


def _encode(array: np.ndarray, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt, **options)
    return out.getvalue()


def _pil(data: bytes) -> np.ndarray:
    """(C, H, W) as Pillow decodes it, EXIF orientation applied."""
    with Image.open(io.BytesIO(data)) as img:
        img = ImageOps.exif_transpose(img)
        array = np.asarray(img if img.mode == "L" else img.convert("RGB"))
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _diff(got: torch.Tensor, expected: np.ndarray) -> np.ndarray:
    assert tuple(got.shape) == expected.shape and got.dtype == torch.uint8
    return np.abs(got.numpy().astype(np.int16) - expected.astype(np.int16))


@needs_dali
def test_png_rgb_and_gray_equal_pillow():
    rgb, gray = _encode(skimage.data.astronaut(), "PNG"), _encode(skimage.data.camera(), "PNG")
    (got_rgb,) = dali.decode_batch([rgb], device="cpu")
    (got_gray,) = dali.decode_batch([gray], device="cpu", channels=1)
    assert got_rgb.is_contiguous() and got_gray.shape == (1, 512, 512)
    assert _diff(got_rgb, _pil(rgb)).max() == 0
    assert _diff(got_gray, _pil(gray)).max() == 0


@needs_dali
def test_jpeg_within_measured_tolerance():
    files = [open(os.path.join(SKIMAGE_DATA, name), "rb").read() for name in ("retina.jpg", "rocket.jpg")]
    files.append(_encode(skimage.data.astronaut(), "JPEG", quality=85, subsampling=2, progressive=True))
    for data, got in zip(files, dali.decode_batch(files, device="cpu")):
        assert _diff(got, _pil(data)).max() <= JPEG_TOLERANCE
    gray = _encode(skimage.data.camera(), "JPEG")
    assert _diff(dali.decode_batch([gray], device="cpu", channels=1)[0], _pil(gray)).max() <= JPEG_TOLERANCE


@needs_dali
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_like_pillow(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(skimage.data.astronaut()[:120, :200], "JPEG", quality=95, exif=exif)
    (got,) = dali.decode_batch([data], device="cpu")
    assert _diff(got, _pil(data)).max() <= JPEG_TOLERANCE  # shapes match: (3, 200, 120) for 6 and 8


@needs_dali
def test_resize_against_pillow_antialiased_bicubic():
    photos = [skimage.data.astronaut(), skimage.data.immunohistochemistry(), skimage.data.chelsea()]
    sizes = [(128, 128), (409, 460), (600, 902)]  # 4x down, slightly down, 2x up
    encoded = [_encode(photo, "PNG") for photo in photos]
    for photo, size, got in zip(photos, sizes, dali.decode_batch(encoded, device="cpu", sizes=sizes)):
        h, w = size
        expected = np.asarray(Image.fromarray(photo).resize((w, h), Image.BICUBIC)).transpose(2, 0, 1)
        diff = _diff(got, expected)
        assert diff.mean() <= RESIZE_MEAN and np.percentile(diff, 99) <= RESIZE_P99 and diff.max() <= RESIZE_MAX
    (gray,) = dali.decode_batch([_encode(skimage.data.camera(), "PNG")], device="cpu", sizes=[(100, 50)], channels=1)
    assert gray.shape == (1, 100, 50)


@needs_dali
def test_a_corrupt_image_does_not_lose_the_others():
    good_png, good_jpeg = _encode(skimage.data.astronaut(), "PNG"), _encode(skimage.data.chelsea(), "JPEG")
    batch = [good_png, b"not an image", good_jpeg, good_png[: len(good_png) // 2]]
    with pytest.raises(dali.DecodeBatchError, match=r"2 of 4 images.*#1: .*#3: ") as err:
        dali.decode_batch(batch, device="cpu")
    assert isinstance(err.value, ValueError) and set(err.value.failed) == {1, 3}
    images = err.value.images
    assert images[1] is None and images[3] is None
    assert _diff(images[0], _pil(good_png)).max() == 0
    assert _diff(images[2], _pil(good_jpeg)).max() <= JPEG_TOLERANCE
    assert len(dali.decode_batch([good_png], device="cpu")) == 1  # the broken pipeline was replaced


@needs_dali
def test_varying_batch_sizes_reuse_one_pipeline():
    encoded = [_encode(np.full((16 + i % 5, 24, 3), i, np.uint8), "PNG") for i in range(70)]
    dali.decode_batch(encoded[:1], device="cpu")
    built = dali.pipelines_built()
    for n in (1, 7, 3, 64, 70, 2, 33):  # 70 runs as 64 + 6
        images = dali.decode_batch(encoded[:n], device="cpu")
        assert [int(image[0, 0, 0]) for image in images] == list(range(n))
    assert dali.pipelines_built() == built
    assert dali.decode_batch([], device="cpu") == []


@needs_dali
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
def test_a_forked_child_builds_its_own_pipelines():
    png = _encode(np.full((8, 8, 3), 5, np.uint8), "PNG")
    dali.decode_batch([png], device="cpu")  # the parent holds a built pipeline
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the inherited pipeline's threads are not here: using it would hang
        try:
            os.write(write, bytes([int(dali.decode_batch([png], device="cpu")[0][0, 0, 0])]))
        finally:
            os._exit(0)
    os.close(write)
    deadline = time.monotonic() + 30
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            pytest.fail("the forked child hung decoding")
        time.sleep(0.05)
    assert os.read(read, 1) == b"\x05"
    os.close(read)
    assert dali.decode_batch([png], device="cpu")[0].shape == (3, 8, 8)  # the parent's still works


@needs_dali
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: device='gpu' is valid")
def test_gpu_without_a_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        dali.decode_batch([_encode(np.zeros((4, 4, 3), np.uint8), "PNG")], device="gpu")


@needs_dali
def test_bad_arguments():
    png = _encode(np.zeros((4, 4, 3), np.uint8), "PNG")
    with pytest.raises(ValueError, match="channels"):
        dali.decode_batch([png], channels=4)
    with pytest.raises(ValueError, match="1 sizes for 2 images"):
        dali.decode_batch([png, png], sizes=[(2, 2)])
    with pytest.raises(ValueError, match="device"):
        dali.decode_batch([png], device="tpu")


def test_without_dali_decode_batch_says_what_to_install(monkeypatch):
    monkeypatch.setattr(dali, "available", lambda: False)
    with pytest.raises(ImportError, match="needs NVIDIA DALI"):
        dali.decode_batch([b"..."], device="cpu")
