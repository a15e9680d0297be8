"""Image decoding and the content-hash image store.

A decoded `SourceImage` keeps the full depth of the file (CT in Hounsfield units,
16-bit X-ray and MR values) so that tools can re-window it; 8-bit photographs
(pathology, fundus, ultrasound screenshots) stay uint8. The store decodes each
distinct image once and serves it to every episode and turn that uses it.
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
from typing import Any, Mapping

import numpy as np
import torch

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
    data = ref.read_bytes()
    name, suffix = ref.describe(), ref.suffix
    if not data:
        raise ImageDecodeError(f"{name}: empty file")
    if _is_dicom(data, suffix):
        pixels, window, invert, meta = decode_dicom(data, ref.frame, name)
    elif _is_nifti(data, suffix):
        pixels, window, invert, meta = decode_nifti(data, ref.frame, name)
    else:
        pixels, window, invert, meta = decode_pil(data, name)
    return SourceImage(content_key(data, ref.frame), pixels, window, invert, meta)


class ImageStore:
    """Decoded images keyed by content hash, least recently used evicted past `max_bytes`.

    Path refs are hashed once per (path, mtime, size), so a hit costs a stat, not a read.
    """

    def __init__(self, max_bytes: int = 2 << 30, device: str | torch.device = "cpu"):
        self.max_bytes = max_bytes
        self.device = torch.device(device)
        self._images: OrderedDict[str, SourceImage] = OrderedDict()
        self._path_keys: dict[tuple, str] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._images)

    def __getstate__(self) -> dict:
        """A copied or pickled store starts empty: decoded pixels stay where they were decoded."""
        return {"max_bytes": self.max_bytes, "device": str(self.device)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_bytes"], state["device"])  # type: ignore[misc]

    def _path_key(self, ref: ImageRef) -> tuple | None:
        if ref.path is None:
            return None
        try:
            stat = os.stat(ref.path)
        except OSError:
            return None
        return (ref.path, stat.st_mtime_ns, stat.st_size, ref.frame)

    def get(self, ref: ImageRef) -> SourceImage:
        path_key = self._path_key(ref)
        with self._lock:
            key = self._path_keys.get(path_key) if path_key else None
            if key is None and ref.data is not None:
                key = content_key(ref.data, ref.frame)
            if key is not None and key in self._images:
                self.hits += 1
                self._images.move_to_end(key)
                return self._images[key]
        image = decode_image(ref)
        if image.pixels.device != self.device:
            image = SourceImage(image.key, image.pixels.to(self.device), image.window, image.invert, image.meta)
        with self._lock:
            self.misses += 1
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
