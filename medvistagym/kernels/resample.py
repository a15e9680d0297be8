"""Pillow-exact separable resampling weights, vectorised over outputs and over boxes.

`axis_weights` reproduces the arithmetic of Pillow's `precompute_coeffs`
(src/libImaging/Resample.c) for one axis of many boxes at once: box edges are
rounded to float32 as Pillow's C layer receives them, everything after that is
float64 like Pillow's doubles. Weight computation lives here, apart from any way
of applying them, so torch, Triton and DALI back ends share one set of taps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch

Number = Union[int, float]
Batch = Union[Number, Sequence[Number], torch.Tensor]

# Pillow keeps 8-bit coefficients as fixed point with 22 fraction bits (PRECISION_BITS).
PRECISION_BITS = 22


def _triangle(x: torch.Tensor) -> torch.Tensor:
    return (1.0 - x.abs()).clamp(min=0.0)


def _cubic(x: torch.Tensor) -> torch.Tensor:
    # Keys cubic with a = -0.5, the same polynomial evaluation order as Pillow.
    a = -0.5
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


# mode -> (filter, support radius in input pixels at scale 1)
FILTERS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], float]] = {
    "bilinear": (_triangle, 1.0),
    "bicubic": (_cubic, 2.0),
}


@dataclass(frozen=True)
class AxisWeights:
    """Taps for one axis of N boxes, padded to a common output length O and tap count K.

    Output o of box n is `sum_k weights[n, o, k] * input[first[n, o] + k]`; only the
    first `count[n, o]` taps are real, the rest are zero weights (and `count` is 0 for
    rows past that box's own output size).
    """

    first: torch.Tensor  # (N, O) int64
    count: torch.Tensor  # (N, O) int64
    weights: torch.Tensor  # (N, O, K) float64, each real row sums to 1

    def span(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per box, the input interval [lo, hi) that any of its taps reads."""
        real = self.count > 0
        big = torch.iinfo(torch.int64).max
        lo = torch.where(real, self.first, big).amin(dim=1)
        hi = torch.where(real, self.first + self.count, 0).amax(dim=1)
        return lo, hi


def _flat(value: Batch, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(value, dtype=dtype).reshape(-1)


def axis_weights(
    in_size: Batch,
    start: Batch,
    end: Batch,
    out_size: Batch,
    *,
    mode: str = "bicubic",
    antialias: bool = True,
) -> AxisWeights:
    """Resampling taps mapping input interval [start, end) of length-`in_size` axes to `out_size` samples.

    Every argument is a number or a length-N batch (broadcast together), so the taps of
    all boxes come out of one set of tensor ops. `antialias=True` is Pillow: the filter
    widens by the downscale factor; False keeps the unscaled filter (plain interpolation).
    """
    if mode not in FILTERS:
        raise ValueError(f"mode must be one of {sorted(FILTERS)}, got {mode!r}")
    kernel, radius = FILTERS[mode]
    in_size_t, out_t, start32, end32 = torch.broadcast_tensors(
        _flat(in_size, torch.int64),
        _flat(out_size, torch.int64),
        _flat(start, torch.float32),
        _flat(end, torch.float32),
    )
    if bool((in_size_t < 1).any() | (out_t < 1).any() | (end32 <= start32).any()):
        raise ValueError("axis_weights needs in_size >= 1, out_size >= 1 and end > start (in float32)")

    # Pillow: scale = (double)(in1 - in0) / outSize, the difference taken in float32.
    scale = (end32 - start32).double() / out_t.double()
    filterscale = scale.clamp(min=1.0) if antialias else torch.ones_like(scale)
    support = radius * filterscale

    o = torch.arange(int(out_t.max()), dtype=torch.float64)
    center = start32.double()[:, None] + (o + 0.5) * scale[:, None]  # (N, O)
    # (int)(v + 0.5) truncates toward zero; negatives are clamped to 0 right after, so floor is equivalent.
    first = torch.floor(center - support[:, None] + 0.5).clamp(min=0).long()
    stop = torch.minimum(torch.floor(center + support[:, None] + 0.5).long(), in_size_t[:, None])
    real_row = o[None, :] < out_t[:, None]
    count = torch.where(real_row, (stop - first).clamp(min=0), 0)
    first = torch.where(real_row, first, 0)

    k = torch.arange(max(int(count.max()), 1), dtype=torch.int64)
    x = (first[..., None] + k).double()  # (N, O, K) absolute input index of each tap
    w = kernel((x - center[..., None] + 0.5) * (1.0 / filterscale)[:, None, None])
    w = torch.where(k < count[..., None], w, 0.0)
    total = w.sum(dim=-1, keepdim=True)
    w = torch.where(total != 0.0, w / torch.where(total != 0.0, total, 1.0), w)
    return AxisWeights(first=first, count=count, weights=w)


def quantize_8bit(weights: torch.Tensor) -> torch.Tensor:
    """Weights as Pillow's 8-bit path uses them: fixed point rounded half away from zero."""
    scaled = weights * (1 << PRECISION_BITS)
    return torch.where(scaled < 0, torch.ceil(scaled - 0.5), torch.floor(scaled + 0.5)) / (1 << PRECISION_BITS)
