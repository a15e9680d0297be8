"""Image decoding and the content-hash image store.

A decoded `SourceImage` keeps the full depth of the file (CT in Hounsfield units,
16-bit X-ray and MR values) so that tools can re-window it; 8-bit photographs
(pathology, fundus, ultrasound screenshots) stay uint8. The store decodes each
distinct image once and serves it to every episode and turn that uses it; with NVIDIA DALI
installed, `ImageStore.get_many` decodes a batch's 8-bit PNG/JPEG misses in one DALI pipeline.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..kernels import dali as dali_kernels
from .task import ImageRef

Window = tuple[float, float]  # (center, width) in the image's physical units


class ImageDecodeError(ValueError):
    """An image file that cannot be decoded; the message names the file."""


@dataclass(frozen=True, eq=False)
class SourceImage:
    key: str
    pixels: torch.Tensor  # (C, H, W): uint8 for 8-bit images, float32 in physical units otherwise
    window: Window | None = None  # default display window of a full-depth image
    invert: bool = False  # DICOM MONOCHROME1: high values display dark
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(self.pixels.shape[-1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[-2])

    @property
    def channels(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def full_depth(self) -> bool:
        return self.pixels.dtype.is_floating_point

    @property
    def nbytes(self) -> int:
        return self.pixels.numel() * self.pixels.element_size()


def apply_window(values: torch.Tensor, window: Window, invert: bool = False) -> torch.Tensor:
    """DICOM linear VOI window (PS3.3 C.11.2.1.2) to uint8."""
    center, width = window
    width = max(float(width), 1.0)
    scaled = ((values.float() - (center - 0.5)) / (width - 1.0) + 0.5).clamp_(0.0, 1.0)
    if invert:
        scaled = 1.0 - scaled
    return scaled.mul_(255.0).round_().to(torch.uint8)


def to_display(image: SourceImage, values: torch.Tensor | None = None, window: Window | None = None) -> torch.Tensor:
    """uint8 (C,H,W) for showing `values` (default: the whole image) to a model."""
    values = image.pixels if values is None else values
    if not values.dtype.is_floating_point and window is None:
        return values.to(torch.uint8)
    window = window or image.window or robust_window(values)
    return apply_window(values, window, invert=image.invert)


def robust_window(values: torch.Tensor) -> Window:
    """A window spanning the 0.5–99.5 percentiles: for images whose header gives none."""
    flat = values.float().flatten()
    if flat.numel() > 1_000_000:  # quantile on a strided sample: same answer, less work
        flat = flat[:: flat.numel() // 1_000_000 + 1]
    low, high = torch.quantile(flat, torch.tensor([0.005, 0.995])).tolist()
    if high <= low:
        low, high = float(flat.min()), float(flat.max()) + 1.0
    return ((low + high) / 2.0, high - low)


# --------------------------------------------------------------------------- decoders


def _first(value: Any) -> float | None:
    """DICOM multi-valued window fields: take the first (the default) value."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return float(value[0]) if len(value) else None
    return float(value)


def _dicom_meta(ds: Any) -> dict[str, Any]:
    keys = (
        "Modality", "BodyPartExamined", "ViewPosition", "StudyDescription", "SeriesDescription",
        "PhotometricInterpretation", "ImageLaterality", "Laterality", "PatientPosition", "ProtocolName",
    )
    meta = {k: str(ds.get(k)) for k in keys if ds.get(k) not in (None, "")}
    spacing = ds.get("PixelSpacing")
    if spacing is not None:
        meta["PixelSpacing"] = [float(v) for v in spacing]
    return meta


def decode_dicom(data: bytes, frame: int | None, name: str) -> tuple[torch.Tensor, Window | None, bool, dict]:
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        array = ds.pixel_array
    except Exception as err:  # pydicom raises many types for broken files
        raise ImageDecodeError(f"{name}: not a readable DICOM image ({type(err).__name__}: {err})") from err
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        index = frames // 2 if frame is None else frame
        if not 0 <= index < frames:
            raise ImageDecodeError(f"{name}: frame {index} out of range (the file has {frames})")
        array = array[index]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    meta = _dicom_meta(ds)
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(array, ds)
        if rgb.dtype != np.uint8:  # 16-bit LUT entries
            rgb = (rgb.astype(np.float32) / 257.0).round().astype(np.uint8)
        return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))), None, False, meta
    if array.ndim == 3:  # RGB (pydicom already converted YBR to RGB)
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).to(torch.uint8), None, False, meta
    values = np.asarray(apply_modality_lut(array, ds), dtype=np.float32)  # slope/intercept -> HU etc.
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    window = (center, width) if center is not None and width else None
    tensor = torch.from_numpy(np.ascontiguousarray(values))[None]
    return tensor, window or robust_window(tensor), photometric == "MONOCHROME1", meta


def decode_nifti(data: bytes, frame: int | None, name: str) -> tuple[torch.Tensor, Window, bool, dict]:
    import nibabel as nib

    try:
        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        volume = nib.Nifti1Image.from_bytes(raw)
        array = np.asarray(volume.get_fdata(dtype=np.float32))
    except Exception as err:
        raise ImageDecodeError(f"{name}: not a readable NIfTI image ({type(err).__name__}: {err})") from err
    if array.ndim == 4:
        array = array[..., 0]
    index = None
    if array.ndim == 3:
        depth = array.shape[2]
        index = depth // 2 if frame is None else frame
        if not 0 <= index < depth:
            raise ImageDecodeError(f"{name}: slice {index} out of range (the volume has {depth})")
        array = array[:, :, index]
    # NIfTI stores x fastest with y pointing anterior: transpose and flip for the radiological view.
    slice_ = np.ascontiguousarray(np.flipud(array.T))
    tensor = torch.from_numpy(slice_)[None]
    return tensor, robust_window(tensor), False, {"slice": index}  # NIfTI does not record the modality


def decode_pil(data: bytes, name: str) -> tuple[torch.Tensor, Window | None, bool, dict]:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(f"{name}: not a readable image ({type(err).__name__}: {err})") from err
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # full-depth grayscale
        tensor = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())[None]
        return tensor, robust_window(tensor), False, {}
    if img.mode == "L":
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())[None], None, False, {}
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))), None, False, {}


def _is_dicom(data: bytes, suffix: str) -> bool:
    return suffix == ".dcm" or data[128:132] == b"DICM"


def _is_nifti(data: bytes, suffix: str) -> bool:
    if suffix in (".nii", ".nii.gz"):
        return True
    head = data
    if data[:2] == b"\x1f\x8b":  # gzipped: inflate just the header
        head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[:4096], 352)
    return head[344:348] in (b"n+1\x00", b"ni1\x00")  # the magic at byte 344 of the header


def content_key(data: bytes, frame: int | None = None) -> str:
    digest = hashlib.sha1(data).hexdigest()
    return digest if frame is None else f"{digest}:{frame}"


def decode_image(ref: ImageRef) -> SourceImage:
    """Decode the image behind `ref` (DICOM, NIfTI or anything PIL reads)."""
    return _decode_bytes(ref.read_bytes(), ref)


def _decode_bytes(data: bytes, ref: ImageRef) -> SourceImage:
    name, suffix = ref.describe(), ref.suffix
    if not data:
        raise ImageDecodeError(f"{name}: empty file")
    if _is_dicom(data, suffix):
        (pixels, window, invert, meta), decoder = decode_dicom(data, ref.frame, name), "pydicom"
    elif _is_nifti(data, suffix):
        (pixels, window, invert, meta), decoder = decode_nifti(data, ref.frame, name), "nibabel"
    else:
        (pixels, window, invert, meta), decoder = decode_pil(data, name), "pil"
    return SourceImage(content_key(data, ref.frame), pixels, window, invert, {**meta, "decoder": decoder})


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR_TYPES = (0, 2, 3, 4, 6)  # gray, RGB, palette, gray + alpha, RGBA
_JPEG_HUFFMAN_FRAMES = (0xC0, 0xC1, 0xC2)  # SOF0-2: baseline, extended and progressive 8/12-bit


def dali_channels(data: bytes, suffix: str = "") -> int | None:
    """1 or 3 for an 8-bit PNG or JPEG that DALI decodes to `decode_pil`'s pixels, None otherwise.

    The channels follow `decode_pil`: 8-bit grayscale keeps one channel; colour, palette and alpha
    images become RGB (alpha dropped). 16-bit and sub-byte PNGs, CMYK, 12-bit, lossless and
    arithmetic-coded JPEGs, DICOM and NIfTI stay with the full decoders.
    """
    if not data or _is_dicom(data, suffix) or _is_nifti(data, suffix):
        return None
    if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) >= 26:
        depth, colour = data[24], data[25]  # from the IHDR chunk, which PNG requires first
        if depth != 8 or colour not in _PNG_COLOUR_TYPES:
            return None
        return 1 if colour == 0 else 3
    if data.startswith(b"\xff\xd8"):
        return _jpeg_channels(data)
    return None


def _jpeg_channels(data: bytes) -> int | None:
    """Components of an 8-bit Huffman-coded JPEG, read from its frame header."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _JPEG_HUFFMAN_FRAMES:
            if pos + 10 > len(data):
                return None
            precision, components = data[pos + 4], data[pos + 9]
            return components if precision == 8 and components in (1, 3) else None
        if marker == 0xDA or (0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)):
            return None  # another frame type (lossless, arithmetic), or a scan before any frame
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


class ImageStore:
    """Decoded images keyed by content hash, least recently used evicted past `max_bytes`.

    Path refs are hashed once per (path, mtime, size), so a hit costs a stat, not a read.
    `use_dali` (None: when DALI is installed) lets `get_many` batch 8-bit PNG/JPEG decodes in DALI,
    on the GPU when `device` is CUDA. `SourceImage.meta["decoder"]` records the decoder used.
    """

    def __init__(self, max_bytes: int = 2 << 30, device: str | torch.device = "cpu", use_dali: bool | None = None):
        if use_dali and not dali_kernels.available():
            raise ImportError("ImageStore(use_dali=True) needs NVIDIA DALI (the nvidia-dali-cuda12x package)")
        self.max_bytes = max_bytes
        self.device = torch.device(device)
        self.use_dali = dali_kernels.available() if use_dali is None else use_dali
        self._use_dali_arg = use_dali  # what a copy resolves again where it lands
        self._images: OrderedDict[str, SourceImage] = OrderedDict()
        self._path_keys: dict[tuple, str] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._images)

    def __getstate__(self) -> dict:
        """A copied or pickled store starts empty: decoded pixels stay where they were decoded."""
        return {"max_bytes": self.max_bytes, "device": str(self.device), "use_dali": self._use_dali_arg}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_bytes"], state["device"], state.get("use_dali"))  # type: ignore[misc]

    def _path_key(self, ref: ImageRef) -> tuple | None:
        if ref.path is None:
            return None
        try:
            stat = os.stat(ref.path)
        except OSError:
            return None
        return (ref.path, stat.st_mtime_ns, stat.st_size, ref.frame)

    def get(self, ref: ImageRef) -> SourceImage:
        # One image goes through get_many too: with DALI a lone 1.5-2 MP JPEG took 8-9 ms against
        # 18-23 ms on the PIL path (whose copies after decoding cost more than libjpeg-turbo itself),
        # same pixels; a tiny image pays ~0.1 ms of pipeline overhead.
        return self.get_many([ref])[0]

    def get_many(self, refs: Sequence[ImageRef]) -> list[SourceImage]:
        """The images behind `refs` in order: hits from the cache, the misses decoded together.

        With DALI, 8-bit PNG/JPEG misses share one DALI batch per channel count; the others
        (16-bit PNG, DICOM, NIfTI, ...) and whatever DALI rejects use `decode_image`'s decoders.
        A corrupt image raises ImageDecodeError naming its file once the other images are cached.
        """
        path_keys = [self._path_key(ref) for ref in refs]
        images = [self._cached(ref, path_key) for ref, path_key in zip(refs, path_keys)]
        misses = [i for i, image in enumerate(images) if image is None]
        if not misses:
            return images  # type: ignore[return-value]
        datas = [refs[i].read_bytes() for i in misses]
        keys = [content_key(data, refs[i].frame) for i, data in zip(misses, datas)]
        todo = {key: (refs[i], data) for i, key, data in zip(misses, keys, datas)}  # each content once
        with self._lock:  # content decoded before under another path or as embedded bytes
            known = {key: self._images[key] for key in todo if key in self._images}
        fresh = self._decode_all({key: item for key, item in todo.items() if key not in known})
        decoded, first_use = {**known, **fresh}, set(fresh)
        error = None
        for i, key in zip(misses, keys):
            result = decoded[key]
            if isinstance(result, ImageDecodeError):
                error = error or result
            else:
                images[i] = self._add(result, path_keys[i], miss=key in first_use)
                first_use.discard(key)
        if error is not None:
            raise error
        return images  # type: ignore[return-value]

    def _decode_all(self, todo: dict[str, tuple[ImageRef, bytes]]) -> dict[str, SourceImage | ImageDecodeError]:
        """Decode each (ref, bytes) by content key; a corrupt image maps to its ImageDecodeError."""
        results: dict[str, SourceImage | ImageDecodeError] = {}
        if self.use_dali:
            results.update(self._decode_dali(todo))
        for key, (ref, data) in todo.items():
            if key not in results:  # not for DALI, or DALI failed: PIL decodes it or names the file
                try:
                    results[key] = _decode_bytes(data, ref)
                except ImageDecodeError as err:
                    results[key] = err
        return results

    def _decode_dali(self, todo: dict[str, tuple[ImageRef, bytes]]) -> dict[str, SourceImage]:
        device = "gpu" if self.device.type == "cuda" else "cpu"
        groups: dict[int, list[str]] = {}
        for key, (ref, data) in todo.items():
            channels = dali_channels(data, ref.suffix)
            if channels is not None:
                groups.setdefault(channels, []).append(key)
        results = {}
        for channels, keys in groups.items():
            try:
                pixels = dali_kernels.decode_batch([todo[key][1] for key in keys], device=device, channels=channels)
            except dali_kernels.DecodeBatchError as err:
                pixels = err.images  # None where DALI failed
            for key, image in zip(keys, pixels):
                if image is not None:
                    results[key] = SourceImage(key, image, meta={"decoder": f"dali-{device}"})
        return results

    def _cached(self, ref: ImageRef, path_key: tuple | None) -> SourceImage | None:
        with self._lock:
            key = self._path_keys.get(path_key) if path_key else None
            if key is None and ref.data is not None:
                key = content_key(ref.data, ref.frame)
            if key is None or key not in self._images:
                return None
            self.hits += 1
            self._images.move_to_end(key)
            return self._images[key]

    def _add(self, image: SourceImage, path_key: tuple | None, miss: bool = True) -> SourceImage:
        """Cache an image (a miss when this call decoded it); returns the cached one
        when another call stored it first."""
        if image.pixels.device != self.device:
            image = SourceImage(image.key, image.pixels.to(self.device), image.window, image.invert, image.meta)
        with self._lock:
            if miss:
                self.misses += 1
            else:
                self.hits += 1
            if path_key:
                self._path_keys[path_key] = image.key
            if image.key not in self._images:
                self._images[image.key] = image
                self._bytes += image.nbytes
                self._evict()
            return self._images.get(image.key, image)

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and len(self._images) > 1:
            _, old = self._images.popitem(last=False)
            self._bytes -= old.nbytes
