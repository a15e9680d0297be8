"""Plain helpers and tables for checking crop_resize back ends against Pillow.

Imported by the test modules next to it (pytest's default "prepend" import mode puts this
directory on sys.path); the fixtures (`ihc`, `camera`, `backend`) are in conftest.py.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
MODES = tuple(PIL_FILTERS)

# Largest uint8 difference from Pillow each back end may show: the torch reference is within
# one level, the compiled CPU back end is bit-exact.
UINT8_LEVELS = {"torch": 1, "cpu": 0}

# Boxes (x1, y1, x2, y2) on a 512 x 512 image and output (h, w), covering the cases Pillow treats specially.
CASES = {
    "upscale-fractional": ((100.25, 60.5, 163.75, 140.125), (301, 233)),
    "downscale-fractional": ((3.3, 7.9, 500.1, 480.6), (97, 131)),
    "mixed-up-and-down": ((10.0, 20.0, 410.0, 60.0), (50, 300)),
    "whole-image": ((0.0, 0.0, 512.0, 512.0), (256, 384)),
    "identity": ((0.0, 0.0, 512.0, 512.0), (512, 512)),
    "touching-left-top": ((0.0, 0.0, 37.5, 81.2), (64, 48)),
    "touching-right-bottom": ((470.7, 430.2, 512.0, 512.0), (90, 33)),
    "one-pixel-wide-output": ((50.0, 50.0, 300.0, 400.0), (120, 1)),
    "one-pixel-high-output": ((50.5, 50.0, 300.0, 60.0), (1, 77)),
    "one-by-one-output": ((0.0, 0.0, 512.0, 512.0), (1, 1)),
    "thin-box": ((200.0, 0.0, 200.6, 512.0), (64, 16)),
    "extreme-aspect-wide": ((0.0, 255.0, 512.0, 257.0), (3, 500)),
    "extreme-aspect-tall": ((255.0, 0.0, 256.5, 512.0), (500, 2)),
    "tall-downscale-vertical-first": ((0.0, 0.0, 512.0, 512.0), (16, 480)),
    "sub-pixel-box": ((10.2, 20.4, 10.7, 20.9), (9, 7)),
}


def as_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, C) array -> (C, H, W) tensor."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t[None] if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def pil_resize(arr: np.ndarray, box: tuple[float, ...], size: tuple[int, int], mode: str) -> np.ndarray:
    """Pillow's answer as (C, h, w); float32 arrays go through mode "F" one channel at a time."""
    if arr.dtype == np.float32 and arr.ndim == 3:
        return np.concatenate([pil_resize(arr[..., c], box, size, mode) for c in range(arr.shape[2])])
    im = Image.fromarray(arr, "F") if arr.dtype == np.float32 else Image.fromarray(arr)
    out = np.asarray(im.resize((size[1], size[0]), PIL_FILTERS[mode], box=box))
    return out[None] if out.ndim == 2 else out.transpose(2, 0, 1)


def level_diff(ours: torch.Tensor, ref: np.ndarray | torch.Tensor) -> int:
    """Largest difference in levels between `ours` and a reference of the same dtype and shape
    (a uint8 Pillow array asks for a uint8 result)."""
    mine = ours.numpy()
    ref = ref.numpy() if isinstance(ref, torch.Tensor) else ref
    assert mine.dtype == ref.dtype and mine.shape == ref.shape, (mine.dtype, mine.shape, ref.dtype, ref.shape)
    return int(np.abs(mine.astype(np.int64) - ref.astype(np.int64)).max())


def noise(h: int, w: int, channels: int = 0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, channels) if channels else (h, w), dtype=np.uint8)


def random_boxes(shapes: list[tuple[int, int]], n: int, seed: int, max_out: int = 90) -> tuple[list, list, list]:
    """n boxes cycling over images of the given (h, w), with per-box output sizes and image indices."""
    rng = np.random.default_rng(seed)
    boxes, sizes, index = [], [], []
    for i in range(n):
        j = i % len(shapes)
        h, w = shapes[j]
        x1, y1 = rng.uniform(0, w - 2), rng.uniform(0, h - 2)
        boxes.append((x1, y1, rng.uniform(x1 + 0.5, w), rng.uniform(y1 + 0.5, h)))
        sizes.append((int(rng.integers(1, max_out)), int(rng.integers(1, max_out))))
        index.append(j)
    return boxes, sizes, index
