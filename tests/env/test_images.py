import io
import os

import nibabel
import numpy as np
import pydicom
import pytest
import skimage.data
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from medvistagym.env import images as images_module
from medvistagym.env.images import ImageDecodeError, ImageStore, apply_window, dali_channels, decode_image, to_display
from medvistagym.env.task import ImageRef
from medvistagym.kernels import dali as dali_kernels

NIFTI = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")
NIFTI_GZ = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "example4d.nii.gz")


def _png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array, mode=mode).save(out, format="PNG")
    return out.getvalue()


def test_ct_in_hounsfield_units_with_the_header_window():
    path = get_testdata_file("693_UNCR.dcm")
    ds = pydicom.dcmread(path)
    image = decode_image(ImageRef(path=path))
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert image.full_depth and image.pixels.shape == (1, 512, 512)
    assert torch.equal(image.pixels[0], torch.from_numpy(expected))
    assert image.pixels.min() < -900  # air, in HU
    assert image.window == (40.0, 100.0)  # the header's brain window
    assert image.meta["Modality"] == "CT"


def test_mr_rescale_slope_is_applied():
    path = get_testdata_file("MR2_UNCR.dcm")
    ds = pydicom.dcmread(path)
    image = decode_image(ImageRef(path=path))
    assert float(image.pixels.max()) == pytest.approx(float(ds.pixel_array.max()) * float(ds.RescaleSlope), rel=1e-4)


def test_monochrome1_displays_inverted():
    image = decode_image(ImageRef(path=get_testdata_file("RG1_UNCR.dcm")))
    assert image.invert and image.window == (15000.0, 30000.0)
    shown = to_display(image)
    values, shown = image.pixels.flatten(), shown.flatten()
    assert shown[torch.argmax(values)] < 40 < 200 < shown[torch.argmin(values)]  # high values show dark


def test_colour_and_palette_dicom_become_rgb():
    us = decode_image(ImageRef(path=get_testdata_file("US1_UNCR.dcm")))
    assert us.pixels.dtype == torch.uint8 and us.pixels.shape == (3, 480, 640) and us.window is None
    palette = decode_image(ImageRef(path=get_testdata_file("OBXXXX1A.dcm")))
    assert palette.pixels.shape == (3, 600, 800)


def test_jpeg2000_dicom_decodes():
    image = decode_image(ImageRef(path=get_testdata_file("JPEG2000.dcm")))
    assert image.pixels.shape == (1, 1024, 256) and image.meta["Modality"] == "NM"
    assert image.window is not None  # no header window: a robust one from the data


def test_nifti_slices():
    middle = decode_image(ImageRef(path=NIFTI))
    volume = nibabel.load(NIFTI).get_fdata()
    assert middle.pixels.shape == (1, volume.shape[1], volume.shape[0])
    first = decode_image(ImageRef(path=NIFTI, frame=0))
    assert not torch.equal(first.pixels, middle.pixels)
    assert first.key != middle.key
    gz = decode_image(ImageRef(path=NIFTI_GZ))
    assert gz.pixels.ndim == 3
    with pytest.raises(ImageDecodeError, match="slice 99 out of range"):
        decode_image(ImageRef(path=NIFTI, frame=99))


def test_png_jpeg_and_16_bit():
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    assert torch.equal(decode_image(ImageRef(data=_png_bytes(rgb))).pixels, torch.from_numpy(rgb).permute(2, 0, 1))
    gray16 = (np.arange(600, dtype=np.uint16) * 100).reshape(20, 30)
    image = decode_image(ImageRef(data=_png_bytes(gray16)))
    assert image.full_depth and float(image.pixels.max()) == 59900.0  # the full 16-bit depth is kept
    jpeg = io.BytesIO()
    Image.fromarray(rgb).save(jpeg, format="JPEG")
    assert decode_image(ImageRef(data=jpeg.getvalue(), name="x.jpg")).pixels.shape == (3, 20, 30)


@pytest.mark.parametrize("data,name,match", [
    (b"", "scan-17.png", "empty file"),
    (b"not an image at all", "scan-17.png", "not a readable image"),
    (b"\x00" * 128 + b"DICM" + b"\x00" * 50, "scan-17", "not a readable DICOM"),
    (b"garbage", "scan-17.dcm", "not a readable DICOM"),
])
def test_corrupt_images_raise_naming_the_file(data, name, match):
    with pytest.raises(ImageDecodeError, match=match) as err:
        decode_image(ImageRef(data=data, name=name))
    assert name in str(err.value)


def test_truncated_png_names_the_file(tmp_path):
    path = tmp_path / "cut.png"
    path.write_bytes(_png_bytes(np.zeros((64, 64), np.uint8))[:60])
    with pytest.raises(ImageDecodeError, match="cut.png"):
        decode_image(ImageRef(path=str(path)))


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.png"):
        decode_image(ImageRef(path="/nonexistent/nope.png"))


def test_window_follows_dicom_formula():
    values = torch.tensor([-1000.0, -160.0, 40.0, 240.0, 1000.0])
    shown = apply_window(values, (40.0, 400.0))
    assert shown.tolist()[0] == 0 and shown.tolist()[-1] == 255
    assert abs(int(shown[2]) - 128) <= 1


def test_store_decodes_each_image_once_by_content(tmp_path):
    data = _png_bytes(np.full((8, 8), 7, np.uint8))
    (tmp_path / "a.png").write_bytes(data)
    (tmp_path / "b.png").write_bytes(data)  # same content, other path
    store = ImageStore()
    a = store.get(ImageRef(path=str(tmp_path / "a.png")))
    assert store.get(ImageRef(path=str(tmp_path / "b.png"))) is a
    assert store.get(ImageRef(data=data)) is a
    assert store.get(ImageRef(path=str(tmp_path / "a.png"))) is a
    assert len(store) == 1 and store.hits >= 1


def test_store_evicts_least_recently_used():
    store = ImageStore(max_bytes=200)
    refs = [ImageRef(data=_png_bytes(np.full((10, 10), i, np.uint8))) for i in range(3)]  # 100 bytes each
    first = store.get(refs[0])
    store.get(refs[1])
    store.get(refs[0])  # refresh the first
    store.get(refs[2])  # evicts the second
    assert len(store) == 2
    assert store.get(refs[0]) is first


def test_store_copies_and_pickles_empty():
    import copy
    import pickle

    store = ImageStore(max_bytes=1234)
    store.get(ImageRef(data=_png_bytes(np.zeros((4, 4), np.uint8))))
    for clone in (copy.deepcopy(store), pickle.loads(pickle.dumps(store))):
        assert len(clone) == 0 and clone.max_bytes == 1234
        assert clone.get(ImageRef(data=_png_bytes(np.zeros((4, 4), np.uint8)))).pixels.shape == (1, 4, 4)


def test_two_dimensional_nifti(tmp_path):
    path = tmp_path / "slice.nii"
    nibabel.save(nibabel.Nifti1Image(np.arange(12, dtype=np.int16).reshape(4, 3), np.eye(4)), path)
    image = decode_image(ImageRef(path=str(path)))
    assert image.pixels.shape == (1, 3, 4) and image.meta["slice"] is None


# --------------------------------------------------------------------------- get_many and DALI

SKIMAGE_DATA = os.path.dirname(skimage.data.__file__)
needs_dali = pytest.mark.skipif(not dali_kernels.available(), reason="NVIDIA DALI is not importable")
DALI_CHOICES = [False, pytest.param(True, marks=needs_dali)]


def _jpeg_bytes(array: np.ndarray, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", **options)
    return out.getvalue()


def _mixed_refs(tmp_path) -> list[ImageRef]:
    gray_jpeg = tmp_path / "camera.jpg"
    gray_jpeg.write_bytes(_jpeg_bytes(skimage.data.camera()))
    rgba = np.dstack([skimage.data.chelsea(), np.full((300, 451), 128, np.uint8)])
    return [
        ImageRef(path=os.path.join(SKIMAGE_DATA, "ihc.png")),  # 8-bit RGB PNG
        ImageRef(data=_png_bytes(skimage.data.camera()), name="camera.png"),  # 8-bit gray PNG
        ImageRef(path=os.path.join(SKIMAGE_DATA, "rocket.jpg")),  # RGB JPEG
        ImageRef(path=str(gray_jpeg)),  # gray JPEG
        ImageRef(data=_png_bytes(rgba), name="cat.png"),  # RGBA PNG: alpha dropped
        ImageRef(data=_png_bytes((np.arange(600, dtype=np.uint16) * 100).reshape(20, 30))),  # 16-bit PNG
        ImageRef(path=get_testdata_file("693_UNCR.dcm")),  # CT in HU
    ]


@needs_dali
def test_get_many_with_dali_matches_pil_for_a_mixed_batch(tmp_path):
    refs = _mixed_refs(tmp_path)
    with_dali = ImageStore(use_dali=True).get_many(refs)
    with_pil = ImageStore(use_dali=False).get_many(refs)
    for ref, a, b in zip(refs, with_dali, with_pil):
        assert (a.key, a.pixels.dtype, a.pixels.shape) == (b.key, b.pixels.dtype, b.pixels.shape)
        assert (a.window, a.invert) == (b.window, b.invert)
        # PNG is lossless; DALI's CPU JPEG decoder and Pillow both run libjpeg-turbo (measured 0 apart)
        tolerance = 1 if ref.suffix == ".jpg" else 0
        assert (a.pixels.double() - b.pixels.double()).abs().max() <= tolerance, ref.describe()
    assert [image.channels for image in with_dali] == [3, 1, 3, 1, 3, 1, 1]
    assert [image.meta["decoder"] for image in with_dali] == ["dali-cpu"] * 5 + ["pil", "pydicom"]
    assert [image.meta["decoder"] for image in with_pil] == ["pil"] * 6 + ["pydicom"]
    assert with_dali[6].meta["Modality"] == "CT"


@pytest.mark.parametrize("use_dali", DALI_CHOICES)
def test_get_many_serves_hits_from_the_cache(tmp_path, monkeypatch, use_dali):
    ihc = os.path.join(SKIMAGE_DATA, "ihc.png")
    ct = get_testdata_file("693_UNCR.dcm")
    refs = [ImageRef(path=ihc), ImageRef(data=_png_bytes(np.full((8, 8), 3, np.uint8))), ImageRef(path=ct)]
    store = ImageStore(use_dali=use_dali)
    first = store.get_many(refs + [refs[1]])  # a repeat within the batch decodes once
    assert first[3] is first[1] and (store.misses, store.hits) == (3, 1)
    copy = tmp_path / "copy.png"  # same bytes under another path: found by content, not decoded
    copy.write_bytes(open(ihc, "rb").read())

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cached image was decoded again")

    monkeypatch.setattr(images_module, "_decode_bytes", no_decoding)
    monkeypatch.setattr(dali_kernels, "decode_batch", no_decoding)
    again = store.get_many([refs[2], ImageRef(path=str(copy)), refs[0], refs[1]])
    assert all(a is b for a, b in zip(again, [first[2], first[0], first[0], first[1]]))
    assert (store.misses, store.hits) == (3, 5) and len(store) == 3
    assert store.get(refs[0]) is first[0]


@pytest.mark.parametrize("use_dali", DALI_CHOICES)
def test_get_many_names_the_corrupt_file_and_keeps_the_others(tmp_path, use_dali):
    good = ImageRef(data=_png_bytes(np.full((8, 8, 3), 9, np.uint8)), name="good.png")
    cut = tmp_path / "cut.png"  # a whole IHDR (8-bit gray, so it is DALI's), then nothing
    cut.write_bytes(_png_bytes(np.zeros((64, 64), np.uint8))[:60])
    jpeg = _jpeg_bytes(skimage.data.chelsea())
    half = ImageRef(data=jpeg[: len(jpeg) // 2], name="scan-17.jpg")
    store = ImageStore(use_dali=use_dali)
    with pytest.raises(ImageDecodeError) as err:
        store.get_many([good, ImageRef(path=str(cut)), half])
    with pytest.raises(ImageDecodeError) as expected:
        decode_image(ImageRef(path=str(cut)))
    assert str(err.value) == str(expected.value) and "cut.png" in str(err.value)  # the PIL path's message
    assert len(store) == 1 and store.get(good).pixels.shape == (3, 8, 8) and store.hits == 1
    with pytest.raises(ImageDecodeError, match="scan-17.jpg: not a readable image"):
        store.get_many([half])


@needs_dali
def test_what_dali_rejects_and_pil_reads_comes_from_pil():
    data = _png_bytes(skimage.data.camera())[:-12]  # no IEND chunk: libpng in DALI refuses, Pillow reads
    image = ImageStore(use_dali=True).get_many([ImageRef(data=data, name="no-iend.png")])[0]
    assert image.meta["decoder"] == "pil" and torch.equal(image.pixels, decode_image(ImageRef(data=data)).pixels)


def test_dali_channels_follow_the_pil_path():
    gray, rgb = skimage.data.camera()[:16, :16], skimage.data.astronaut()[:16, :16]
    cmyk = io.BytesIO()
    Image.new("CMYK", (8, 8)).save(cmyk, format="JPEG")
    assert dali_channels(_png_bytes(gray)) == 1 and dali_channels(_png_bytes(rgb)) == 3
    assert dali_channels(_jpeg_bytes(gray)) == 1 and dali_channels(_jpeg_bytes(rgb, progressive=True)) == 3
    assert dali_channels(_png_bytes(gray.astype(np.uint16) * 257)) is None  # 16-bit: full depth
    assert dali_channels(cmyk.getvalue()) is None  # CMYK: Pillow's conversion
    assert dali_channels(open(get_testdata_file("693_UNCR.dcm"), "rb").read(), ".dcm") is None
    assert dali_channels(b"not an image") is None and dali_channels(b"\xff\xd8\xff") is None


def test_store_without_dali(monkeypatch):
    import pickle

    monkeypatch.setattr(dali_kernels, "available", lambda: False)
    with pytest.raises(ImportError, match="needs NVIDIA DALI"):
        ImageStore(use_dali=True)
    store = ImageStore()
    assert store.use_dali is False
    image = store.get_many([ImageRef(data=_png_bytes(np.zeros((4, 4), np.uint8)))])[0]
    assert image.meta["decoder"] == "pil"
    assert pickle.loads(pickle.dumps(ImageStore(use_dali=False))).use_dali is False
