"""CPU benchmark of `crop_resize` against the per-crop loops peer systems run.

Times, for random zoom boxes (each side 10-60% of the image's) on several uint8 RGB sources:
(a) `crop_resize` with all crops in one call, (b) Pillow `Image.crop(box).resize(size)` crop by
crop, the way peer systems do it, and (c) torch's `F.interpolate(mode, antialias=True)` crop by
crop on integer-rounded crops. Each method starts from its native input (tensors for ours and
torch, `PIL.Image`s for Pillow) and stops at resized crops in the same representation.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console
from rich.table import Table

from medvistagym.kernels import crop_resize

PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
# skimage.data photos used as sources: pathology, fundus and two natural scenes.
PHOTOS = ("immunohistochemistry", "retina", "astronaut", "coffee")


def bench_crop_resize(
    n_crops: Sequence[int] = (1, 16, 64),
    source_size: tuple[int, int] = (1024, 1024),
    out_size: tuple[int, int] = (448, 448),
    mode: str = "bicubic",
    repeats: int = 5,
    seed: int = 0,
) -> list[dict]:
    """One row per (method, number of crops): median ms per call over `repeats` after a warm-up.

    `source_size` and `out_size` are (height, width). `vs_pil` is Pillow's time over the method's
    time, so above 1 means faster than Pillow.
    """
    if mode not in PIL_FILTERS:
        raise ValueError(f"mode must be one of {sorted(PIL_FILTERS)}, got {mode!r}")
    tensors = _sources(source_size)
    images = [Image.fromarray(t.permute(1, 2, 0).numpy()) for t in tensors]
    rows: list[dict] = []
    for n in n_crops:
        boxes, index = _zoom_boxes(n, source_size, seed)
        whole = [_whole_pixels(b) for b in boxes]  # Image.crop and tensor slicing take whole pixels
        methods: dict[str, Callable[[], object]] = {
            "crop_resize (one batched call)": lambda: crop_resize(
                tensors, boxes, out_size, image_index=index, mode=mode
            ),
            "PIL crop + resize (loop)": lambda: [
                images[j].crop(b).resize((out_size[1], out_size[0]), PIL_FILTERS[mode]) for b, j in zip(whole, index)
            ],
            "torch F.interpolate antialias (loop)": lambda: [
                F.interpolate(tensors[j][None, :, y1:y2, x1:x2], size=out_size, mode=mode, antialias=True)
                for (x1, y1, x2, y2), j in zip(whole, index)
            ],
        }
        times = {name: _median_ms(run, repeats) for name, run in methods.items()}
        pil_ms = times["PIL crop + resize (loop)"]
        for name, ms in times.items():
            rows.append(
                {"method": name, "crops": n, "ms_per_call": ms, "crops_per_s": n / ms * 1e3, "vs_pil": pil_ms / ms}
            )
    return rows


def print_table(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for column in ("method", "crops", "ms / call", "crops / s", "speed vs PIL"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(
            row["method"],
            str(row["crops"]),
            f"{row['ms_per_call']:.1f}",
            f"{row['crops_per_s']:.0f}",
            f"{row['vs_pil']:.2f}x",
        )
    Console().print(table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-crops", type=int, nargs="+", default=[1, 16, 64], help="crops per call (several allowed)")
    parser.add_argument("--source-size", type=int, nargs=2, default=[1024, 1024], metavar=("H", "W"))
    parser.add_argument("--out-size", type=int, nargs=2, default=[448, 448], metavar=("H", "W"))
    parser.add_argument("--mode", choices=sorted(PIL_FILTERS), default="bicubic")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    source, out = tuple(args.source_size), tuple(args.out_size)
    rows = bench_crop_resize(args.n_crops, source, out, args.mode, args.repeats, args.seed)
    title = (
        f"crop + resize, {args.mode}: {len(PHOTOS)} uint8 RGB sources of {source[0]}x{source[1]} -> {out[0]}x{out[1]}, "
        f"{torch.get_num_threads()} torch threads, median of {args.repeats}"
    )
    print_table(rows, title)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time crop_resize against Pillow and torch on CPU.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


def _sources(size: tuple[int, int]) -> list[torch.Tensor]:
    """The PHOTOS resized to `size`, as (3, H, W) uint8 tensors."""
    from skimage import data  # loaded on use so that importing this module stays cheap

    photos = [Image.fromarray(getattr(data, name)()) for name in PHOTOS]
    resized = [np.array(p.resize((size[1], size[0]), Image.BICUBIC)) for p in photos]
    return [torch.from_numpy(arr).permute(2, 0, 1).contiguous() for arr in resized]


def _zoom_boxes(n: int, size: tuple[int, int], seed: int) -> tuple[list[tuple[float, ...]], list[int]]:
    """`n` fractional boxes, each side 10-60% of the image's, spread over the sources."""
    rng = np.random.default_rng(seed + n)
    h, w = size
    bw, bh = rng.uniform(0.1, 0.6, n) * w, rng.uniform(0.1, 0.6, n) * h
    x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    boxes = [(float(a), float(b), float(a + c), float(b + d)) for a, b, c, d in zip(x1, y1, bw, bh)]
    return boxes, rng.integers(0, len(PHOTOS), n).tolist()


def _whole_pixels(box: tuple[float, ...]) -> tuple[int, int, int, int]:
    x1, y1 = round(box[0]), round(box[1])
    return x1, y1, max(round(box[2]), x1 + 1), max(round(box[3]), y1 + 1)


def _median_ms(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: first-call allocations and lazy initialisation
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


if __name__ == "__main__":
    raise SystemExit(main())
