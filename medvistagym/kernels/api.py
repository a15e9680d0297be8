"""The public kernels, one function each, dispatching to a back end.

Back ends apply a `ResamplePlan`:
- "torch": the reference; always there.
- "cpu": compiled C++ (OpenMP, AVX2), built on first use; the CPU default when it builds.
- "triton": one launch for all boxes; the default for CUDA tensors.
Back end modules are imported only when used: Triton's interpreter (for tests on CPU) must be
switched on before its kernels are defined.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Sequence

import torch

from .patchify import Patches, PresetLike, preset as resolve_preset, zoom_sizes
from .plan import Boxes, Images, ResamplePlan, Sizes, plan_resample

# name -> (module with available(), its crop_resize, its crop_patchify)
_BACKENDS = {
    "torch": ("medvistagym.kernels.crop_resize", "crop_resize_torch", "medvistagym.kernels.patchify:crop_patchify_torch"),
    "cpu": ("medvistagym.kernels.cpu_backend", "crop_resize_cpu", "crop_patchify_cpu"),
    "triton": ("medvistagym.kernels.triton_backend", "crop_resize_triton", "crop_patchify_triton"),
}
BACKENDS = tuple(_BACKENDS)


def _function(backend: str, kernel: int) -> Callable[..., Any]:
    """Kernel 1 (crop_resize) or 2 (crop_patchify) of a back end; "module:name" names another module."""
    module, name = _BACKENDS[backend][0], _BACKENDS[backend][kernel]
    if ":" in name:
        module, name = name.split(":")
    return getattr(importlib.import_module(module), name)


def backend_available(name: str) -> bool:
    return name == "torch" or bool(importlib.import_module(_BACKENDS[name][0]).available())


def choose_backend(backend: str, plan: ResamplePlan) -> str:
    """The back end to run `plan` with: "auto" is Triton for CUDA tensors, else compiled CPU, else torch."""
    if backend != "auto":
        if backend not in _BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; available: auto, {', '.join(BACKENDS)}")
        return backend
    if any(im.is_cuda for im in plan.images):
        if not backend_available("triton"):
            raise RuntimeError("CUDA images need the Triton back end: pip install triton")
        return "triton"
    return "cpu" if backend_available("cpu") else "torch"


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
    return _function(choose_backend(backend, plan), 1)(plan, out_dtype)


def crop_patchify(
    images: Images,
    boxes: Boxes,
    sizes: Sizes | None = None,
    *,
    preset: PresetLike = "qwen2.5-vl",
    windows: torch.Tensor | Sequence[Sequence[float]] | None = None,
    invert: torch.Tensor | Sequence[bool] | None = None,
    image_index: Sequence[int] | torch.Tensor | None = None,
    mode: str = "bicubic",
    backend: str = "auto",
) -> Patches:
    """Zooms straight to model-ready Qwen-VL patches: crop, resample, window, normalise, patch order.

    `sizes` (h, w) must be multiples of the preset's factor; None picks what the HF processor
    would for each box's source size. Full-depth sources need a `windows` row (center, width).
    The result has the layout of the HF processors' `pixel_values` and `image_grid_thw`.
    """
    vp = resolve_preset(preset)
    if sizes is None:
        sizes = zoom_sizes(boxes, vp)
    plan = plan_resample(images, boxes, sizes, image_index=image_index, mode=mode)
    return _function(choose_backend(backend, plan), 2)(plan, vp, windows, invert)
