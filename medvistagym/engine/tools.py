"""The ToolExecutor: images requested by many episodes, rendered in one batch.

Tools themselves only compute geometry (`env.View`s); pixels come from here. Requests that
arrive within `window_s` of each other (or until `max_views` pile up) share one
`render_views` call, i.e. one batched `crop_resize` per source dtype, and one patchify.
Identical views (the n members of a GRPO group see the same question images; models repeat
zooms) are rendered once. Renders run one at a time in a worker thread, so the event loop
keeps streaming tokens meanwhile and the next batch gathers while one renders.

A batch that raises is retried request by request, so one bad request (e.g. a corrupt
source) fails alone: its episode gets an error observation, the others their images.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..env.views import View, render_views
from ..kernels import PRESETS, patchify
from ..policy import ImageInputs


@dataclass
class Rendered:
    """Images of one request as shown (uint8 (3, h, w)) and as model input: patches (None when
    the policy processes the shown images itself) and their grid."""

    pixels: list[torch.Tensor]
    pixel_values: torch.Tensor | None
    grid_thw: torch.Tensor
    # The episode's images so far with these last: its next request's model input (`join_images`
    # of the history the request came with; the ToolExecutor joins them on its thread).
    inputs: ImageInputs | None = None
    grid: list[list[int]] = field(init=False)  # grid_thw as ints, read off a tensor where it is made

    def __post_init__(self) -> None:
        # The ToolExecutor makes these on its thread: a tensor read on the event loop costs ~5 us.
        self.grid = self.grid_thw.tolist() if self.pixels else []

    @classmethod
    def empty(cls) -> Rendered:
        """No images."""
        return cls([], None, _NO_GRID)


_NO_GRID = torch.zeros(0, 3, dtype=torch.long)  # shared: never written


def join_images(history: ImageInputs | None, rendered: Rendered) -> ImageInputs | None:
    """An episode's model input after `rendered`: its images so far (`history`), these last."""
    if not rendered.pixels:
        return history
    if history is None:
        return ImageInputs(rendered.pixel_values, rendered.grid_thw, list(rendered.pixels))
    patches = None if rendered.pixel_values is None else torch.cat([history.pixel_values, rendered.pixel_values])
    return ImageInputs(patches, torch.cat([history.grid_thw, rendered.grid_thw]), history.display + rendered.pixels)


def _view_key(view: View) -> tuple:
    return (view.image.key, view.region, view.grid, view.orientation, view.window, view.contrast)


def _rgb(pixels: torch.Tensor) -> torch.Tensor:
    """Grayscale renders as three channels, as the HF processors convert them."""
    return pixels.expand(3, -1, -1).contiguous() if pixels.shape[0] == 1 else pixels


_Request = tuple[Sequence[View], ImageInputs | None, asyncio.Future]  # views, history, result


class ToolExecutor:
    def __init__(self, vision: str, *, window_s: float = 0.002, max_views: int = 512, mode: str = "bicubic",
                 patches: bool = True) -> None:
        """`patches=False` skips patchify (the policy takes the shown images); grids still follow `vision`."""
        self.vision, self.window_s, self.max_views, self.mode = vision, window_s, max_views, mode
        self.patches, self.patch_size = patches, PRESETS[vision].patch_size
        self._pending: list[_Request] = []
        self._pending_views = 0
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # of the batch being gathered
        self._lock: asyncio.Lock | None = None
        # Metrics.
        self.batches = 0
        self.requests = 0
        self.views = 0
        self.unique_views = 0
        self.render_s = 0.0
        self.render_cpu_s = 0.0  # CPU time of the rendering thread (what a GPU would take over)
        self.failures = 0

    async def render(self, views: Sequence[View], history: ImageInputs | None = None) -> Rendered:
        """The pixels and patches of `views`, and (`inputs`) the model input of `history` and
        them; raises what rendering them raised."""
        # A gathering batch pins the loop; asking for it costs a getpid system call on Python 3.11.
        loop = self._loop = self._loop if self._pending else asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((views, history, future))
        self._pending_views += len(views)
        if self._pending_views >= self.max_views:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.window_s, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending, self._pending_views = self._pending, [], 0
        if batch:
            asyncio.get_running_loop().create_task(self._run(batch))

    async def _run(self, batch: list[_Request]) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            start = time.perf_counter()
            try:
                results: list[Rendered | BaseException] = list(await asyncio.to_thread(self._render_batch, batch))
            except Exception:  # isolate the culprit: each request on its own
                results = []
                for item in batch:
                    try:
                        results += await asyncio.to_thread(self._render_batch, [item])
                    except Exception as err:
                        self.failures += 1
                        results.append(err)
            self.render_s += time.perf_counter() - start
            self.batches += 1
        for (_, _, future), result in zip(batch, results):
            if future.done():  # its episode was cancelled meanwhile
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    def _render_batch(self, batch: list[_Request]) -> list[Rendered]:
        start = time.thread_time()
        try:
            return self._render_unique(batch)
        finally:
            self.render_cpu_s += time.thread_time() - start

    def _render_unique(self, batch: list[_Request]) -> list[Rendered]:
        unique: dict[tuple, int] = {}
        order: list[View] = []
        slots: list[list[int]] = []
        for views, _, _ in batch:
            row = []
            for view in views:
                key = _view_key(view)
                if key not in unique:
                    unique[key] = len(order)
                    order.append(view)
                row.append(unique[key])
            slots.append(row)
        pixels = [_rgb(p) for p in render_views(order, self.mode)] if order else []
        patches = patchify(pixels, self.vision) if pixels and self.patches else None
        self.requests += len(batch)
        self.views += sum(len(v) for v, _, _ in batch)
        self.unique_views += len(order)
        out = [self._pick(row, pixels, patches) for row in slots]
        for rendered, (_, history, _) in zip(out, batch):
            rendered.inputs = join_images(history, rendered)
        return out

    def _pick(self, row: list[int], pixels: list[torch.Tensor], patches) -> Rendered:
        if not row:
            return Rendered.empty()
        shown = [pixels[i] for i in row]
        if patches is None:
            grid = [(1, p.shape[1] // self.patch_size, p.shape[2] // self.patch_size) for p in shown]
            return Rendered(shown, None, torch.tensor(grid, dtype=torch.long))
        return Rendered(shown, torch.cat([patches.image(i) for i in row]), patches.grid_thw[row])
