"""`medvistagym bench decode`: decoding a batch of JPEGs into the image store, DALI vs PIL.

Workload: N distinct JPEGs of 1-2 MP (scikit-image photos, resized and re-encoded at quality
90, as released VQA images are), given as embedded bytes. Each run uses a fresh store, so
every image is a miss: `get_many` with DALI (one batched pipeline; nvJPEG on a GPU store)
against the same call with `use_dali=False` (PIL one by one). Median of `repeats`.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from typing import Sequence

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from medvistagym.env.images import ImageStore
from medvistagym.env.task import ImageRef
from medvistagym.kernels import dali

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina")


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    from skimage import data

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]
    out = []
    for i in range(n):
        side = int(rng.uniform(1000, 1414))  # 1-2 MP
        aspect = rng.uniform(0.75, 1.33)
        image = photos[i % len(photos)].resize((int(side * aspect), side), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def _median_ms(jpegs: list[bytes], use_dali: bool, device: str, repeats: int) -> float:
    refs = [ImageRef(data=data, name=f"{i}.jpg") for i, data in enumerate(jpegs)]
    ImageStore(use_dali=use_dali, device=device).get_many(refs[:2])  # warm-up: pipelines, libraries
    times = []
    for _ in range(repeats):
        store = ImageStore(use_dali=use_dali, device=device)
        start = time.perf_counter()
        store.get_many(refs)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_decode(counts: Sequence[int] = (64,), device: str = "cpu", repeats: int = 5, seed: int = 0) -> list[dict]:
    rows = []
    for n in counts:
        jpegs = make_jpegs(n, seed)
        megapixels = sum(int(np.prod(Image.open(io.BytesIO(j)).size)) for j in jpegs) / 1e6
        pil = _median_ms(jpegs, False, device, repeats)
        methods = {"PIL, one by one (use_dali=False)": pil}
        if dali.available():
            methods[f"DALI, one batch ({'nvJPEG' if device == 'cuda' else 'CPU'})"] = _median_ms(jpegs, True, device, repeats)
        for name, ms in methods.items():
            rows.append({"method": name, "images": n, "megapixels": megapixels, "ms": ms, "vs_pil": pil / ms})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, nargs="+", default=[64])
    parser.add_argument("--device", default="cpu", help="the store's device: cpu, or cuda for nvJPEG")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    rows = bench_decode(args.images, args.device, args.repeats, args.seed)
    table = Table(title=f"decode JPEGs of 1-2 MP into an ImageStore on {args.device}, median of {args.repeats}")
    for column in ("method", "images", "MP", "ms", "images / s", "vs PIL"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(row["method"], str(row["images"]), f"{row['megapixels']:.0f}", f"{row['ms']:.0f}",
                      f"{row['images'] / row['ms'] * 1e3:.0f}", f"{row['vs_pil']:.2f}x")
    Console(width=max(Console().width, 120)).print(table)
    return 0
