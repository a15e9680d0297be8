"""Image sizes as Qwen2-VL-family processors choose them."""

from __future__ import annotations

import math


def smart_resize(height: float, width: float, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """(height, width): multiples of `factor`, near the input aspect, area in [min, max].

    Same arithmetic as `smart_resize` in transformers' Qwen2-VL image processor
    (including Python's round-half-even), so our patches line up with theirs. The one
    difference: a side that would come out 0 (only possible with min_pixels = 0, where
    transformers then fails) is one factor instead.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio over 200 is not supported, got {width}x{height}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return max(h_bar, factor), max(w_bar, factor)
