"""Synthetic findings for medvista-mini: small faint marks that need a zoom to read.

A finding is 4-8 case pixels across. Cases are shown to the model about 3x
smaller (case area ~10x the shown area), where every finding of a family
becomes the same 2-3 pixel blob: the masks of a family carry equal total ink
and equal spread (mean squared radius ~4.5 px^2), which is all that survives the
reduction, so neither the blob's brightness nor its size tells them apart. A
zoom on the circled region magnifies the finding ~3.5x, where its shape or dot
count is plain.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SHAPES = ("ring", "cross", "square", "dot")
COUNTS = (2, 3, 4)
CANVAS = 11  # finding canvas side, case pixels
INK = 16.0  # total intensity of every finding, in "fully lit pixel" units
MARKER_RADIUS = 24.0  # the circle drawn around the finding, case pixels
MARKER_WIDTH = 4.0
_SUPERSAMPLE = 8


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Supersampled pixel-center coordinates relative to the canvas center."""
    n = size * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / _SUPERSAMPLE - size / 2
    return np.meshgrid(coords, coords)


def _downsample(canvas: np.ndarray, size: int) -> np.ndarray:
    return canvas.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))


def shape_mask(shape: str) -> np.ndarray:
    x, y = _grid(CANVAS)
    r = np.hypot(x, y)
    # Sizes chosen so every shape has the same mean squared radius (~4.5 px^2).
    if shape == "ring":
        inside = np.abs(r - 2.1) <= 0.5
    elif shape == "cross":
        inside = ((np.abs(x) <= 0.5) & (np.abs(y) <= 3.7)) | ((np.abs(y) <= 0.5) & (np.abs(x) <= 3.7))
    elif shape == "square":
        edge = np.maximum(np.abs(x), np.abs(y))
        inside = np.abs(edge - 1.85) <= 0.5
    elif shape == "dot":
        inside = r <= 3.0
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return _normalise(_downsample(inside.astype(np.float32), CANVAS))


def dots_mask(count: int, angle: float) -> np.ndarray:
    """`count` dots of radius 0.9 on a circle of radius 2.1, the first at `angle` radians:
    the same spread for every count, and at least a 1.2 px gap between neighbours."""
    x, y = _grid(CANVAS)
    inside = np.zeros_like(x, dtype=bool)
    for k in range(count):
        theta = angle + 2 * math.pi * k / count
        inside |= np.hypot(x - 2.1 * math.cos(theta), y - 2.1 * math.sin(theta)) <= 0.9
    return _normalise(_downsample(inside.astype(np.float32), CANVAS))


def _normalise(mask: np.ndarray) -> np.ndarray:
    return (mask * (INK / mask.sum())).astype(np.float32)


def ring_mask(radius: float, width: float) -> np.ndarray:
    """An antialiased circle outline (the annotation marker), values in [0, 1]."""
    size = int(math.ceil(2 * (radius + width))) + 2
    x, y = _grid(size)
    return _downsample((np.abs(np.hypot(x, y) - radius) <= width / 2).astype(np.float32), size)


def paste(values: torch.Tensor, mask: np.ndarray, center: tuple[float, float], delta: torch.Tensor) -> None:
    """values[:, patch] += mask * delta (per channel), in place; mask centered at `center`."""
    size = mask.shape[0]
    x0, y0 = int(round(center[0] - size / 2)), int(round(center[1] - size / 2))
    patch = values[:, y0 : y0 + size, x0 : x0 + size]
    patch += torch.from_numpy(mask)[None] * delta.view(-1, 1, 1)


def blend(values: torch.Tensor, mask: np.ndarray, center: tuple[float, float], color: torch.Tensor) -> None:
    """values = values * (1 - mask) + color * mask over the patch, in place."""
    size = mask.shape[0]
    x0, y0 = int(round(center[0] - size / 2)), int(round(center[1] - size / 2))
    patch = values[:, y0 : y0 + size, x0 : x0 + size]
    alpha = torch.from_numpy(mask)[None]
    patch.mul_(1 - alpha).add_(alpha * color.view(-1, 1, 1))


def local_stats(display: torch.Tensor, size: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of a (H, W) image over size x size windows, every
    `stride` pixels; window [i, j] is centered at (j * stride + size // 2, i * stride + size // 2)."""
    x = display[None, None].double()  # double: the variance is a small difference of squares
    mean = F.avg_pool2d(x, size, stride=stride)
    var = F.avg_pool2d(x * x, size, stride=stride) - mean * mean
    return mean[0, 0].float(), var.clamp_min(0).sqrt()[0, 0].float()


def pick_location(display: torch.Tensor, rng: np.random.Generator, margin: int, stride: int = 3) -> tuple[float, float]:
    """A center on smooth, mid-gray tissue where a faint mark shows and nothing clips.

    `display` is the case's (H, W) display intensity in [0, 1]. Thresholds relax
    step by step for images with little smooth tissue.
    """
    mean, std = local_stats(display, CANVAS, stride)
    h, w = display.shape
    ys = torch.arange(mean.shape[0])[:, None] * stride + CANVAS // 2
    xs = torch.arange(mean.shape[1])[None, :] * stride + CANVAS // 2
    inside = (xs >= margin) & (xs < w - margin) & (ys >= margin) & (ys < h - margin)
    for max_std, low, high in ((0.04, 0.12, 0.45), (0.07, 0.1, 0.5), (0.12, 0.08, 0.55), (1.0, 0.0, 1.0)):
        ok = inside & (std <= max_std) & (mean >= low) & (mean <= high)
        candidates = ok.nonzero()
        if len(candidates):
            i, j = candidates[int(rng.integers(len(candidates)))].tolist()
            return float(xs[0, j]), float(ys[i, 0])
    raise ValueError("image too small for a finding")
