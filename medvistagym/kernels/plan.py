"""The plan of a batched crop + resample, shared by every back end (torch, compiled CPU, Triton).

`plan_resample` checks the inputs once, computes Pillow's taps for both axes of every box in
one vectorised call, and records Pillow 13's pass order and which boxes follow its 8-bit
arithmetic. A back end only applies the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

from .resample import AxisWeights, axis_weights

SUPPORTED_DTYPES = (torch.uint8, torch.uint16, torch.int16, torch.float32)

Images = Union[torch.Tensor, Sequence[torch.Tensor]]
Boxes = Union[torch.Tensor, Sequence[Sequence[float]]]
Sizes = Union[torch.Tensor, Sequence[int], Sequence[Sequence[int]]]


@dataclass(frozen=True)
class ResamplePlan:
    images: list[torch.Tensor]  # (C, H, W) each, C = 1 or 3
    image_index: torch.Tensor  # (N,) which image each box cuts from
    boxes: torch.Tensor  # (N, 4) float64 x1, y1, x2, y2 in source pixels
    sizes: torch.Tensor  # (N, 2) int64 output (h, w)
    shapes: torch.Tensor  # (N, 3) int64 (C, H, W) of each box's image
    taps: AxisWeights  # rows 0..N-1: the boxes' x axes, rows N..2N-1: their y axes
    vertical_first: torch.Tensor  # (N,) bool: Pillow 13 runs the vertical pass first
    mode: str
    antialias: bool

    @property
    def n(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def sources(self) -> list[torch.Tensor]:
        """The image of each box."""
        return [self.images[i] for i in self.image_index.tolist()]

    @property
    def eight_bit(self) -> torch.Tensor:
        """(N,) bool: boxes cut from uint8 images follow Pillow's 8-bit arithmetic."""
        is_uint8 = torch.tensor([im.dtype == torch.uint8 for im in self.images], dtype=torch.bool)
        return is_uint8[self.image_index] if self.n else is_uint8[:0]

    def axis(self, name: str) -> AxisWeights:
        """The taps of the "x" or "y" axes of all boxes."""
        rows = slice(0, self.n) if name == "x" else slice(self.n, 2 * self.n)
        return AxisWeights(self.taps.first[rows], self.taps.count[rows], self.taps.weights[rows])


def pillow_vertical_first(
    in_h: torch.Tensor, in_w: torch.Tensor, out_h: torch.Tensor, out_w: torch.Tensor
) -> torch.Tensor:
    """Pillow 13 runs the vertical pass first when the height shrinks by > 2x as many pixels as the width.

    The rule (python-pillow/Pillow#9549) looks at whole-image sizes, not the box; the order only
    matters for uint8, where each pass rounds and clamps.
    """
    return (out_h < in_h) & (in_h - out_h > 2 * (in_w - out_w))


def plan_resample(
    images: Images,
    boxes: Boxes,
    sizes: Sizes,
    *,
    image_index: Sequence[int] | torch.Tensor | None = None,
    mode: str = "bicubic",
    antialias: bool = True,
) -> ResamplePlan:
    """Check the inputs and compute the taps; errors name the box or image and what is wrong."""
    imgs = _images(images)
    box = _boxes(boxes)
    n = box.shape[0]
    hw = _sizes(sizes, n)
    which = _image_index(image_index, len(imgs), n)
    shape = torch.tensor([list(im.shape) for im in imgs], dtype=torch.int64)[which].reshape(n, 3)
    _check_boxes(box, shape[:, 1], shape[:, 2], which)
    # Rows 0..N-1 are the boxes' x axes, rows N..2N-1 their y axes: one call computes every tap.
    taps = axis_weights(
        torch.cat([shape[:, 2], shape[:, 1]]),
        torch.cat([box[:, 0], box[:, 1]]),
        torch.cat([box[:, 2], box[:, 3]]),
        torch.cat([hw[:, 1], hw[:, 0]]),
        mode=mode,
        antialias=antialias,
    ) if n else axis_weights(1, 0.0, 1.0, 1, mode=mode, antialias=antialias)
    vertical_first = pillow_vertical_first(shape[:, 1], shape[:, 2], hw[:, 0], hw[:, 1])
    return ResamplePlan(imgs, which, box, hw, shape, taps, vertical_first, mode, antialias)


def finish(values: torch.Tensor, source: torch.dtype, out_dtype: torch.dtype | None) -> torch.Tensor:
    """Output conventions of every back end: 16-bit results rounded and clamped to their range,
    then cast to `out_dtype` as one contiguous tensor. 8-bit results arrive as uint8 already;
    float32 results pass through unrounded."""
    if source in (torch.uint16, torch.int16):
        values = _clamp(_round_half_away(values), source)
    target = out_dtype or source
    if target != source and not target.is_floating_point:
        values = _clamp(_round_half_away(values.float()), target)
    return values.to(target, memory_format=torch.contiguous_format).contiguous()


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    # Pillow's ROUND_UP; torch.round would round halves to even.
    return torch.where(x < 0, torch.ceil(x - 0.5), torch.floor(x + 0.5))


def _clamp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    info = torch.iinfo(dtype)
    return x.clamp(info.min, info.max)


def _images(images: Images) -> list[torch.Tensor]:
    imgs = [images] if isinstance(images, torch.Tensor) else list(images)
    if not imgs:
        raise ValueError("images is empty")
    for j, im in enumerate(imgs):
        if not isinstance(im, torch.Tensor) or im.dim() != 3 or im.shape[0] not in (1, 3):
            got = tuple(im.shape) if isinstance(im, torch.Tensor) else type(im).__name__
            raise ValueError(f"image {j} must be a (C, H, W) tensor with C = 1 or 3, got {got}")
        if im.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"image {j} has dtype {im.dtype}; supported: {', '.join(map(str, SUPPORTED_DTYPES))}")
        if im.shape[1] == 0 or im.shape[2] == 0:
            raise ValueError(f"image {j} is empty: shape {tuple(im.shape)}")
    return imgs


def _boxes(boxes: Boxes) -> torch.Tensor:
    box = torch.as_tensor(boxes, dtype=torch.float64)
    if box.numel() == 0:
        return box.reshape(0, 4)
    if box.dim() != 2 or box.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4) as x1, y1, x2, y2; got {tuple(box.shape)}")
    return box


def _sizes(sizes: Sizes, n: int) -> torch.Tensor:
    size = torch.as_tensor(sizes)
    if size.is_floating_point() and not bool((size == size.round()).all()):
        raise ValueError(f"sizes must be whole numbers of pixels, got {size.tolist()}")
    size = size.long()
    if size.shape == (2,):
        size = size.expand(n, 2)
    elif size.shape != (n, 2):
        raise ValueError(f"sizes must be one (h, w) pair or {n} of them (one per box), got shape {tuple(size.shape)}")
    bad = (size < 1).any(dim=1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"size {i} {tuple(size[i].tolist())} must be at least 1 x 1")
    return size


def _image_index(image_index: Sequence[int] | torch.Tensor | None, m: int, n: int) -> torch.Tensor:
    if image_index is None:
        if m == 1:
            return torch.zeros(n, dtype=torch.int64)
        if m == n:
            return torch.arange(n)
        raise ValueError(f"image_index is required with {m} images and {n} boxes")
    which = torch.as_tensor(image_index, dtype=torch.int64)
    if which.shape != (n,):
        raise ValueError(f"image_index must name one image per box: {n} boxes, got shape {tuple(which.shape)}")
    bad = (which < 0) | (which >= m)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"image_index[{i}] = {int(which[i])} is out of range for {m} images")
    return which


def _check_boxes(box: torch.Tensor, height: torch.Tensor, width: torch.Tensor, which: torch.Tensor) -> None:
    # Pillow receives float32 edges, so judge them as float32 too.
    x1, y1, x2, y2 = box.float().unbind(dim=1)
    problems = (
        (~torch.isfinite(box).all(dim=1), "has a non-finite coordinate"),
        (x2 <= x1, "is empty or inverted (x2 <= x1)"),
        (y2 <= y1, "is empty or inverted (y2 <= y1)"),
        ((x1 < 0) | (y1 < 0) | (x2 > width) | (y2 > height), "is outside its image"),
    )
    for bad, why in problems:
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            j = int(which[i])
            raise ValueError(
                f"box {i} {tuple(box[i].tolist())} {why}: image {j} is {int(width[i])} wide and {int(height[i])} high"
            )
