"""Qwen-VL patchify, and the torch reference of the fused zoom path (crop, resample, window, patchify).

`patchify_torch` gives, for images already at their final size, what transformers'
`Qwen2VLImageProcessorPil` gives after its resize (transformers 5.23,
models/qwen2_vl/image_processing_pil_qwen2_vl.py): `pixel_values` with the images' rows
concatenated and `image_grid_thw`. `crop_patchify_torch` is the reference the compiled CPU
and Triton back ends are tested against; its docstring is the contract.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence, Union

import torch

from .crop_resize import crop_resize_torch
from .plan import Boxes, ResamplePlan
from .sizing import smart_resize

# HF's rescale_factor (0.00392156862745098 in the released configs).
RESCALE = 1 / 255

# OpenAI CLIP statistics, as in the Qwen2-VL and Qwen2.5-VL configs.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionPreset:
    name: str
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    min_pixels: int
    max_pixels: int

    @property
    def factor(self) -> int:
        """Image sides must be multiples of this: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size


# Values of the released preprocessor_config.json files on the Hugging Face hub, read through
# copies of them (e.g. huggingface.co/morthens/qwen2-vl-7b-infer, "Duplicate from
# Qwen/Qwen2-VL-7B-Instruct"; huggingface.co/cdreetz/Qwen3-VL-8B-Instruct) and code that embeds
# them. Qwen/Qwen2-VL-7B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct: min_pixels 3136, max_pixels
# 12845056, patch 14, temporal 2, merge 2, CLIP mean/std. Qwen/Qwen3-VL-8B-Instruct:
# size {shortest_edge 65536, longest_edge 16777216}, patch 16, temporal 2, merge 2, mean = std = 0.5.
PRESETS: dict[str, VisionPreset] = {
    p.name: p
    for p in (
        VisionPreset("qwen2-vl", 14, 2, 2, CLIP_MEAN, CLIP_STD, 3136, 12845056),
        VisionPreset("qwen2.5-vl", 14, 2, 2, CLIP_MEAN, CLIP_STD, 3136, 12845056),
        VisionPreset("qwen3-vl", 16, 2, 2, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 65536, 16777216),
    )
}

PresetLike = Union[str, VisionPreset]


def preset(name_or_preset: PresetLike) -> VisionPreset:
    """A preset by name ("qwen2-vl", "qwen2.5-vl", "qwen3-vl"); a VisionPreset is returned as is."""
    if isinstance(name_or_preset, VisionPreset):
        return name_or_preset
    if isinstance(name_or_preset, str) and name_or_preset in PRESETS:
        return PRESETS[name_or_preset]
    raise ValueError(f"unknown vision preset {name_or_preset!r}; known: {', '.join(PRESETS)}")


# The public functions take a parameter named `preset`, which hides the function inside them.
_resolve = preset


@dataclass(frozen=True)
class Patches:
    """Patches of n images in the layout of the Qwen-VL processors.

    Rows of image i are `pixel_values[offsets[i]:offsets[i + 1]]`; within an image, rows run
    over merge blocks (row-major), then over the merge_size x merge_size patches of a block
    (row-major); columns run over (channel, temporal copy, patch row, patch column).
    """

    pixel_values: torch.Tensor  # (sum of t*h*w over images, C*T*P*P) float32
    grid_thw: torch.Tensor  # (n, 3) int64: temporal, height, width in patches
    offsets: torch.Tensor  # (n + 1,) int64 row offsets

    def image(self, i: int) -> torch.Tensor:
        """The rows of image i."""
        return self.pixel_values[int(self.offsets[i]) : int(self.offsets[i + 1])]


def normalise(levels: torch.Tensor, vp: VisionPreset) -> torch.Tensor:
    """(3, h, w) display levels 0..255 -> float32 model input, bit for bit as HF computes it:
    rescale in float64 then store float32, then (x - mean) / std in float32."""
    x = (levels.to(torch.float64) * RESCALE).to(torch.float32)
    mean = torch.tensor(vp.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(vp.image_std, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std


def patchify_torch(images: torch.Tensor | Sequence[torch.Tensor], preset: PresetLike) -> Patches:
    """Normalise and patchify (3, h, w) images of display levels 0..255 (uint8 or float).

    h and w must be multiples of `preset.factor`; nothing is resized here. A still image is
    one temporal step: its frame is repeated temporal_patch_size times.
    """
    vp = _resolve(preset)
    imgs = [images] if isinstance(images, torch.Tensor) else list(images)
    for i, im in enumerate(imgs):
        _check_image(im, i, vp)
    rows = [_patchify_one(im, vp) for im in imgs]
    grid = torch.tensor(
        [[1, im.shape[1] // vp.patch_size, im.shape[2] // vp.patch_size] for im in imgs], dtype=torch.int64
    ).reshape(-1, 3)
    offsets = torch.zeros(len(imgs) + 1, dtype=torch.int64)
    offsets[1:] = grid.prod(dim=1).cumsum(0)
    columns = 3 * vp.temporal_patch_size * vp.patch_size**2
    pixel_values = torch.cat(rows) if rows else torch.zeros(0, columns)
    return Patches(pixel_values, grid, offsets)


def _check_image(im: torch.Tensor, i: int, vp: VisionPreset) -> None:
    if not isinstance(im, torch.Tensor) or im.dim() != 3 or im.shape[0] != 3:
        got = tuple(im.shape) if isinstance(im, torch.Tensor) else type(im).__name__
        raise ValueError(f"image {i} must be a (3, h, w) tensor of display levels, got {got}")
    if im.dtype != torch.uint8 and not im.dtype.is_floating_point:
        raise ValueError(f"image {i} has dtype {im.dtype}; display levels are uint8 or float")
    h, w = im.shape[1:]
    if h == 0 or w == 0 or h % vp.factor or w % vp.factor:
        raise ValueError(
            f"image {i} is {h} high and {w} wide; {vp.name} needs multiples of {vp.factor} "
            f"(patch {vp.patch_size} x merge {vp.merge_size})"
        )


def _patchify_one(image: torch.Tensor, vp: VisionPreset) -> torch.Tensor:
    c, h, w = image.shape
    t, m, p = vp.temporal_patch_size, vp.merge_size, vp.patch_size
    frames = normalise(image, vp)[None].expand(t, c, h, w)
    grid = frames.reshape(1, t, c, h // (p * m), m, p, w // (p * m), m, p)
    # -> (1, blocks down, blocks across, m, m, c, t, p, p): HF's order.
    return grid.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(-1, c * t * p * p)


def display_levels(
    values: torch.Tensor,
    windows: torch.Tensor | Sequence[float] | None = None,
    invert: torch.Tensor | bool = False,
) -> torch.Tensor:
    """What a model is shown of resampled values: float32 levels 0..255, always 3 channels.

    `values` is (C, h, w) or (N, C, h, w) with C = 1 or 3. uint8 values are display levels
    already: without `windows` they pass through; with one they are windowed like any value
    (a re-windowed 8-bit X-ray). Any other dtype is full depth and needs `windows`, (2,) or
    (N, 2) as (center, width). `invert` (bool or (N,)) applies to windowed values.
    Windowing is the DICOM linear VOI function (PS3.3 C.11.2.1.2), as env.images.apply_window:
    with c' = float32(center - 0.5), w' = float32(max(width, 1) - 1), both from float64,
    s = (v - c') / w' + 0.5 in float32, NaN -> 0 (a NaN value, or a value at the threshold of a
    width-1 window), clamped to [0, 1], 1 - s if inverted, then round(255 s) half to even.
    One channel is replicated to three.
    """
    if values.dim() not in (3, 4) or values.shape[-3] not in (1, 3):
        raise ValueError(f"values must be (C, h, w) or (N, C, h, w) with C = 1 or 3, got {tuple(values.shape)}")
    if values.dtype == torch.uint8 and windows is None:
        levels = values.float()
    else:
        levels = _window(values, windows, invert)
    return levels.expand(*levels.shape[:-3], 3, *levels.shape[-2:]).contiguous()


def _window(
    values: torch.Tensor, windows: torch.Tensor | Sequence[float] | None, invert: torch.Tensor | bool
) -> torch.Tensor:
    lead = tuple(values.shape[:-3])
    win = None if windows is None else torch.as_tensor(windows, dtype=torch.float64)
    if win is None or not bool(torch.isfinite(win).all()):
        raise ValueError(f"full-depth values ({values.dtype}) need a finite window (center, width), got {windows}")
    if win.shape != (*lead, 2):
        raise ValueError(f"windows must have shape {(*lead, 2)} for values of shape {tuple(values.shape)}")
    flip = torch.as_tensor(invert, dtype=torch.bool)
    if flip.shape not in ((), lead):
        raise ValueError(f"invert must be one bool or shape {lead}, got shape {tuple(flip.shape)}")
    center, width = win.unbind(-1)
    low = (center - 0.5).float()[..., None, None, None]
    span = (width.clamp(min=1.0) - 1.0).float()[..., None, None, None]
    s = torch.nan_to_num((values.float() - low) / span + 0.5, nan=0.0).clamp(0.0, 1.0)
    s = torch.where(flip[..., None, None, None], 1.0 - s, s)
    return (s * 255.0).round()


def crop_patchify_torch(
    plan: ResamplePlan,
    preset: PresetLike,
    windows: torch.Tensor | Sequence[Sequence[float]] | None = None,
    invert: torch.Tensor | Sequence[bool] | None = None,
) -> Patches:
    """The reference of the fused zoom path: box i of the plan becomes image i of the Patches.

    For each box, in float32 unless said otherwise:
    1. resample: `crop_resize_torch` with the plan's taps. Boxes of uint8 sources follow
       Pillow's 8-bit path (uint8 levels, as `Image.resize(box=...)`); every other source
       (uint16, int16, float32) resamples in float32 with no rounding or clamping.
    2. display: `display_levels` with `windows[i]` (center, width) and `invert[i]`. A box with a
       finite window row is windowed whatever its dtype (uint8 levels are values 0..255); a
       uint8 box without one (a NaN row, or no `windows`) passes through; full-depth boxes need
       a finite window. One channel becomes three.
    3. patchify: `patchify_torch` (rescale by 1/255 in float64, normalise in float32).
    Output sizes come from the plan and must be multiples of preset.factor; errors name the box.
    """
    vp = _resolve(preset)
    check_sizes(plan, vp)
    win, flip = box_windows(plan, windows, invert)
    resampled = crop_resize_torch(_float_plan(plan))
    windowed = torch.isfinite(win).all(dim=1).tolist()
    levels = [display_levels(r, win[i] if windowed[i] else None, flip[i]) for i, r in enumerate(resampled)]
    return patchify_torch(levels, vp)


def check_sizes(plan: ResamplePlan, vp: VisionPreset) -> None:
    """Every back end's check that each box resamples to whole merged patches."""
    bad = (plan.sizes % vp.factor != 0).any(dim=1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        h, w = plan.sizes[i].tolist()
        raise ValueError(
            f"box {i} resamples to {h} high and {w} wide; {vp.name} needs multiples of {vp.factor} "
            f"(patch {vp.patch_size} x merge {vp.merge_size})"
        )


def box_windows(
    plan: ResamplePlan,
    windows: torch.Tensor | Sequence[Sequence[float]] | None,
    invert: torch.Tensor | Sequence[bool] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 2) float64 windows (NaN where none was given) and (N,) bool invert, checked per box."""
    n = plan.n
    win = torch.full((n, 2), float("nan"), dtype=torch.float64)
    if windows is not None:
        win = torch.as_tensor(windows, dtype=torch.float64)
        if win.shape != (n, 2):
            raise ValueError(
                f"windows must be (N, 2) as (center, width), one per box: {n} boxes, got {tuple(win.shape)}"
            )
    flip = torch.zeros(n, dtype=torch.bool)
    if invert is not None:
        flip = torch.as_tensor(invert, dtype=torch.bool)
        if flip.shape != (n,):
            raise ValueError(f"invert must be (N,) bool, one per box: {n} boxes, got {tuple(flip.shape)}")
    missing = ~plan.eight_bit & ~torch.isfinite(win).all(dim=1)
    if bool(missing.any()):
        i = int(missing.nonzero()[0])
        dtype = plan.sources[i].dtype
        raise ValueError(
            f"box {i} cuts from a full-depth ({dtype}) image and needs a window (center, width), got {win[i].tolist()}"
        )
    return win, flip


def _float_plan(plan: ResamplePlan) -> ResamplePlan:
    """The plan with 16-bit images as float32: they resample unrounded, like float32 sources."""
    images = [im if im.dtype in (torch.uint8, torch.float32) else im.float() for im in plan.images]
    return replace(plan, images=images)


def zoom_sizes(boxes: Boxes, preset: PresetLike) -> torch.Tensor:
    """(N, 2) int64 (h, w): HF's choice for each box, the smart_resize of its source size
    (y2 - y1, x2 - x1) within the preset's min/max pixels."""
    vp = _resolve(preset)
    box = torch.as_tensor(boxes, dtype=torch.float64)
    if box.numel() == 0:
        return torch.zeros(0, 2, dtype=torch.int64)
    if box.dim() != 2 or box.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4) as x1, y1, x2, y2; got {tuple(box.shape)}")
    sizes = []
    for i, (x1, y1, x2, y2) in enumerate(box.tolist()):
        try:
            sizes.append(smart_resize(y2 - y1, x2 - x1, vp.factor, vp.min_pixels, vp.max_pixels))
        except ValueError as err:
            raise ValueError(f"box {i} {(x1, y1, x2, y2)}: {err}") from err
    return torch.tensor(sizes, dtype=torch.int64)
