"""Views: what the model is shown of a source image, as geometry until rendered.

A `View` is a region of a full-depth `SourceImage` resampled to a grid, then
re-oriented (mirror, quarter turns) and windowed. Tools only compute new views;
pixels are produced by `render_views`, which resamples every view of a batch
with one `crop_resize` call. Because each view points back to the source, a
zoom into a zoom is cut from the original pixels, never from a resampled copy.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from ..kernels import crop_resize
from .images import SourceImage, Window, apply_window, robust_window

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Orientation:
    """A mirror (left-right, applied first) and counterclockwise quarter turns."""

    turns: int = 0
    mirrored: bool = False

    def rotated(self, quarter_turns: int) -> Orientation:
        return Orientation((self.turns + quarter_turns) % 4, self.mirrored)

    def flipped(self, direction: str) -> Orientation:
        # A mirror after R^k equals R^-k after a mirror; a vertical flip is R^2 after a mirror.
        turns = -self.turns if direction == "horizontal" else 2 - self.turns
        return Orientation(turns % 4, not self.mirrored)

    def apply(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.mirrored:
            pixels = pixels.flip(-1)
        return torch.rot90(pixels, self.turns, dims=(-2, -1)) if self.turns else pixels

    def shown_size(self, grid: tuple[int, int]) -> tuple[int, int]:
        w, h = grid
        return (h, w) if self.turns % 2 else (w, h)

    def from_grid(self, x: float, y: float, grid: tuple[int, int]) -> tuple[float, float]:
        """A point on the grid before orientation to shown coordinates."""
        w, h = grid
        if self.mirrored:
            x = w - x
        for _ in range(self.turns):  # one counterclockwise turn: (x, y) -> (y, w - x)
            x, y, w, h = y, w - x, h, w
        return x, y

    def to_grid(self, x: float, y: float, grid: tuple[int, int]) -> tuple[float, float]:
        """A point in shown coordinates back to the grid before orientation."""
        w, h = self.shown_size(grid)
        for _ in range(self.turns):  # undo one counterclockwise turn: (x, y) <- (h - y, x)
            x, y, w, h = h - y, x, h, w
        return (grid[0] - x, y) if self.mirrored else (x, y)


@dataclass(frozen=True)
class View:
    image: SourceImage
    region: Box  # in source pixels
    grid: tuple[int, int]  # (w, h) the region is resampled to, before orientation
    orientation: Orientation = Orientation()
    window: Window | None = None  # None: the image's own default
    contrast: str | None = None  # None, "stretch" or "equalize"

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) as the model sees it."""
        return self.orientation.shown_size(self.grid)

    def to_source(self, box: Box) -> Box:
        """A box in this view's shown pixels to source pixels."""
        (ax, ay), (bx, by) = (self.orientation.to_grid(x, y, self.grid) for x, y in ((box[0], box[1]), (box[2], box[3])))
        x1, y1, x2, y2 = self.region
        sx, sy = (x2 - x1) / self.grid[0], (y2 - y1) / self.grid[1]
        return (x1 + min(ax, bx) * sx, y1 + min(ay, by) * sy, x1 + max(ax, bx) * sx, y1 + max(ay, by) * sy)

    def from_source(self, box: Box) -> Box:
        """A box in source pixels to this view's shown pixels (inverse of `to_source`)."""
        x1, y1, x2, y2 = self.region
        sx, sy = self.grid[0] / (x2 - x1), self.grid[1] / (y2 - y1)
        (ax, ay), (bx, by) = (
            self.orientation.from_grid((x - x1) * sx, (y - y1) * sy, self.grid) for x, y in ((box[0], box[1]), (box[2], box[3]))
        )
        return (min(ax, bx), min(ay, by), max(ax, bx), max(ay, by))

    def zoom(self, box: Box, grid: tuple[int, int]) -> View:
        """The sub-view showing `box` (shown pixels) at `grid`, keeping orientation and window."""
        return replace(self, region=self.to_source(box), grid=grid)


def full_view(image: SourceImage, grid: tuple[int, int]) -> View:
    return View(image, (0.0, 0.0, float(image.width), float(image.height)), grid)


def _equalize(pixels: torch.Tensor) -> torch.Tensor:
    """Histogram equalization of each channel of a uint8 (C,H,W) tensor."""
    out = torch.empty_like(pixels)
    for c in range(pixels.shape[0]):
        hist = torch.bincount(pixels[c].flatten().long(), minlength=256)
        cdf = hist.cumsum(0)
        first = cdf[cdf > 0][0]
        total = cdf[-1]
        lut = ((cdf - first).clamp_min(0) * 255 / max(int(total - first), 1)).round().to(torch.uint8)
        out[c] = lut[pixels[c].long()]
    return out


def show(view: View, values: torch.Tensor) -> torch.Tensor:
    """A view's resampled source values as shown: windowed to uint8, contrast, orientation."""
    window = robust_window(values) if view.contrast == "stretch" else view.window
    if window is None and not values.is_floating_point():
        pixels = values  # an 8-bit photograph, shown as stored
    else:
        window = window or view.image.window or robust_window(values)
        pixels = apply_window(values, window, view.image.invert)
    if view.contrast == "equalize":
        pixels = _equalize(pixels)
    return view.orientation.apply(pixels).contiguous()


def render_views(views: Sequence[View], mode: str = "bicubic") -> list[torch.Tensor]:
    """uint8 (C,H,W) pixels for each view: one batched resample per source dtype."""
    by_dtype: dict[torch.dtype, list[int]] = defaultdict(list)
    for i, view in enumerate(views):
        by_dtype[view.image.pixels.dtype].append(i)
    resampled: list[torch.Tensor | None] = [None] * len(views)
    for indices in by_dtype.values():
        sources: dict[str, int] = {}
        images: list[torch.Tensor] = []
        for i in indices:
            key = views[i].image.key
            if key not in sources:
                sources[key] = len(images)
                images.append(views[i].image.pixels)
        outs = crop_resize(
            images,
            [views[i].region for i in indices],
            [(views[i].grid[1], views[i].grid[0]) for i in indices],
            image_index=[sources[views[i].image.key] for i in indices],
            mode=mode,
        )
        for i, out in zip(indices, outs):
            resampled[i] = out
    return [show(view, values) for view, values in zip(views, resampled)]  # type: ignore[arg-type]
