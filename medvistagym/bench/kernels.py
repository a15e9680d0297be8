"""`medvistagym bench kernels`: a zoom tool's image work, ours against the path peers run.

Workload: N zooms (boxes of 10-60% of each side) spread over four real photos of 1 to 4 MP,
each zoom resampled to 448 x 448 (16 x 16 Qwen-VL patches of 28 pixels). Methods, each from
its native input to its native output:
- peers: per zoom, PIL crop + resize, a JPEG encode + decode (the base64 round trip every
  peer does), then transformers' Qwen2-VL image processor -> pixel_values.
- ours, crop_patchify: the same pixel_values from source tensors, one call for all zooms.
- ours, crop_resize: resampled images only (no patches), one call.
- torch F.interpolate: per zoom on whole-pixel crops, images only (no fractional boxes).
Timing is steady state: a call's outputs are released before the next call, as a rollout
engine consumes them; median of `repeats` after one warm-up call. On CUDA the Triton rows
also report GB/s and the share of the device-to-device copy bandwidth measured in the run.
"""

from __future__ import annotations

import argparse
import gc
import io
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medvistagym.kernels import backend_available, crop_patchify, crop_resize
from medvistagym.kernels.patchify import preset as resolve_preset
from medvistagym.kernels.plan import plan_resample

from .results import save as save_results

# (scikit-image photo, (height, width)): 1.0, 2.4, 3.1 and 4.2 MP.
SOURCES = (("astronaut", (1024, 1024)), ("coffee", (1536, 1536)),
           ("immunohistochemistry", (1536, 2048)), ("retina", (2048, 2048)))


@dataclass
class Workload:
    tensors: list[torch.Tensor]  # (3, H, W) uint8
    images: list[Image.Image]
    boxes: list[tuple[float, float, float, float]]
    index: list[int]
    out: tuple[int, int]

    @property
    def whole(self) -> list[tuple[int, int, int, int]]:
        """The boxes in whole pixels, for the methods that cannot take fractional ones."""
        return [(round(a), round(b), max(round(c), round(a) + 1), max(round(d), round(b) + 1)) for a, b, c, d in self.boxes]


def make_workload(n: int, out: tuple[int, int], seed: int = 0) -> Workload:
    from skimage import data  # loaded on use: importing this module stays cheap

    images = [Image.fromarray(getattr(data, name)()).convert("RGB").resize((w, h), Image.BICUBIC) for name, (h, w) in SOURCES]
    tensors = [torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous() for im in images]
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(images), n).tolist()
    boxes = []
    for j in index:
        h, w = SOURCES[j][1]
        bw, bh = rng.uniform(0.1, 0.6) * w, rng.uniform(0.1, 0.6) * h
        x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        boxes.append((float(x), float(y), float(x + bw), float(y + bh)))
    return Workload(tensors, images, boxes, index, out)


def peers_path(work: Workload, preset: str) -> Callable[[], list[Any]]:
    from transformers import Qwen2VLImageProcessorPil

    vp = resolve_preset(preset)
    processor = Qwen2VLImageProcessorPil(
        patch_size=vp.patch_size, merge_size=vp.merge_size, temporal_patch_size=vp.temporal_patch_size,
        image_mean=list(vp.image_mean), image_std=list(vp.image_std), min_pixels=vp.min_pixels, max_pixels=vp.max_pixels,
    )
    size = (work.out[1], work.out[0])

    def run() -> list[Any]:
        outs = []
        for box, j in zip(work.whole, work.index):
            crop = work.images[j].crop(box).resize(size, Image.BICUBIC)
            encoded = io.BytesIO()
            crop.save(encoded, format="JPEG", quality=95)
            decoded = Image.open(io.BytesIO(encoded.getvalue())).convert("RGB")
            outs.append(processor(images=[decoded], return_tensors="pt"))
        return outs

    return run


def _interpolate(work: Workload) -> Callable[[], list[torch.Tensor]]:
    def run() -> list[torch.Tensor]:
        return [
            F.interpolate(work.tensors[j][None, :, y1:y2, x1:x2].float(), size=work.out, mode="bicubic", antialias=True)
            for (x1, y1, x2, y2), j in zip(work.whole, work.index)
        ]

    return run


def _to(work: Workload, device: str) -> list[torch.Tensor]:
    return [t.to(device) for t in work.tensors]


def methods(work: Workload, preset: str, backends: Sequence[str]) -> dict[str, tuple[str, str, Callable[[], Any]]]:
    """name -> (output kind, device, run)."""
    table: dict[str, tuple[str, str, Callable[[], Any]]] = {}
    try:
        table["peers: PIL crop, JPEG round trip, HF processor"] = ("patches", "cpu", peers_path(work, preset))
    except ImportError:
        Console().print("[yellow]transformers is not installed: no peers' row (pip install medvistagym[bench])")
    for backend in backends:
        device = "cuda" if backend == "triton" else "cpu"
        images = _to(work, device)
        table[f"ours: crop_patchify [{backend}]"] = ("patches", device, lambda b=backend, i=images: crop_patchify(
            i, work.boxes, work.out, image_index=work.index, preset=preset, backend=b))
        table[f"ours: crop_resize [{backend}]"] = ("images", device, lambda b=backend, i=images: crop_resize(
            i, work.boxes, work.out, image_index=work.index, backend=b))
    table["torch F.interpolate per zoom"] = ("images", "cpu", _interpolate(work))
    return table


def _median_ms(run: Callable[[], Any], repeats: int, device: str) -> float:
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    out = run()  # warm-up: compiles, builds pipelines, grows allocator pools
    times = []
    for _ in range(repeats):
        del out  # steady state: the engine has consumed the previous call's outputs
        gc.collect()
        sync()
        start = time.perf_counter()
        out = run()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _bandwidth(work: Workload, ms: float) -> tuple[float, float] | tuple[None, None]:
    """GB/s the Triton crop kernel moved and its share of the measured copy bandwidth."""
    from medvistagym.kernels import triton_backend

    plan = plan_resample(_to(work, "cuda"), work.boxes, work.out, image_index=work.index)
    moved = triton_backend.kernel_bytes(plan)
    gbs = moved / ms / 1e6
    return gbs, gbs / triton_backend.copy_bandwidth_gbs(moved)


def bench_kernels(zooms: Sequence[int] = (64, 512), out: tuple[int, int] = (448, 448), preset: str = "qwen2.5-vl",
                  backends: Sequence[str] | None = None, repeats: int = 3, seed: int = 0) -> list[dict]:
    """One row per (method, number of zooms); `vs_peers` is the peers' time over the method's."""
    if backends is None:
        backends = [b for b in ("torch", "cpu") if backend_available(b)]
        if torch.cuda.is_available() and backend_available("triton"):
            backends.append("triton")
    rows: list[dict] = []
    for n in zooms:
        work = make_workload(n, out, seed)
        timed = {name: (kind, device, _median_ms(run, repeats, device))
                 for name, (kind, device, run) in methods(work, preset, backends).items()}
        peers = next((ms for name, (_, _, ms) in timed.items() if name.startswith("peers")), None)
        for name, (kind, device, ms) in timed.items():
            gbs, share = _bandwidth(work, ms) if name == "ours: crop_resize [triton]" else (None, None)
            rows.append({"method": name, "output": kind, "zooms": n, "ms_per_call": ms, "zooms_per_s": n / ms * 1e3,
                         "vs_peers": peers / ms if peers else None, "gb_per_s": gbs, "copy_share": share})
    return rows


def print_table(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for column in ("method", "output", "zooms", "ms / call", "zooms / s", "vs peers", "GB/s", "of copy BW"):
        table.add_column(column, justify="left" if column in ("method", "output") else "right")
    for row in rows:
        table.add_row(
            escape(row["method"]), row["output"], str(row["zooms"]), f"{row['ms_per_call']:.1f}", f"{row['zooms_per_s']:.0f}",
            "-" if row["vs_peers"] is None else f"{row['vs_peers']:.1f}x",
            "-" if row["gb_per_s"] is None else f"{row['gb_per_s']:.0f}",
            "-" if row["copy_share"] is None else f"{row['copy_share']:.0%}",
        )
    Console(width=max(Console().width, 140)).print(table)  # piped output would wrap at 80 columns


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--zooms", type=int, nargs="+", default=[64, 512], help="zooms per call (several allowed)")
    parser.add_argument("--out-size", type=int, nargs=2, default=[448, 448], metavar=("H", "W"))
    parser.add_argument("--preset", default="qwen2.5-vl")
    parser.add_argument("--backends", nargs="+", help="ours: torch, cpu, triton (default: those available)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows here, and their plots beside it (<stem>-zooms.png)")


def run(args: argparse.Namespace) -> int:
    rows = bench_kernels(args.zooms, tuple(args.out_size), args.preset, args.backends, args.repeats, args.seed)
    sources = ", ".join(f"{w}x{h}" for _, (h, w) in SOURCES)
    title = (f"{args.out_size[0]}x{args.out_size[1]} zooms from uint8 RGB photos ({sources}), {args.preset}, "
             f"{torch.get_num_threads()} torch threads, median of {args.repeats}")
    print_table(rows, title)
    if args.json:
        save_results(args.json, {"out_size": args.out_size, "preset": args.preset,
                                 "torch_threads": torch.get_num_threads(), "repeats": args.repeats, "rows": rows})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
