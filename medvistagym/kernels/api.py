"""The public kernels: one function each, dispatching to a back end.

Back ends apply a `ResamplePlan`: "torch" (the reference; always there). Later back ends
register here by name; "auto" picks the fastest one available for the tensors' device.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .crop_resize import crop_resize_torch
from .plan import Boxes, Images, ResamplePlan, Sizes, plan_resample

CropResize = Callable[[ResamplePlan, "torch.dtype | None"], list[torch.Tensor]]
BACKENDS: dict[str, CropResize] = {"torch": crop_resize_torch}


def _pick(backend: str, plan: ResamplePlan) -> CropResize:
    if backend == "auto":
        return BACKENDS["torch"]
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    return BACKENDS[backend]


def crop_resize(
    images: Images,
    boxes: Boxes,
    sizes: Sizes,
    *,
    image_index: Sequence[int] | torch.Tensor | None = None,
    mode: str = "bicubic",
    antialias: bool = True,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> list[torch.Tensor]:
    """Resample box i of `images[image_index[i]]` to `sizes[i]` = (h, w); returns N (C, h, w) tensors.

    Box by box this is `Image.resize((w, h), BILINEAR/BICUBIC, box=(x1, y1, x2, y2))`: uint8
    within one level of Pillow, float32 within 1e-4. `images` are (C, H, W) tensors (C = 1 or 3;
    uint8, uint16, int16 or float32; sizes may differ); boxes are fractional source pixels.
    """
    plan = plan_resample(images, boxes, sizes, image_index=image_index, mode=mode, antialias=antialias)
    return _pick(backend, plan)(plan, out_dtype)
