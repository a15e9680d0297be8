"""`medvistagym view TRAJECTORIES -o report.html`: the trajectory report of Parquet files."""

from __future__ import annotations

import argparse
import glob
import os
import sys

from .report import build_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trajectories", nargs="+",
                        help="Parquet files of trajectories (rollout / train output); globs are expanded")
    parser.add_argument("-o", "--output", default="report.html", help="the HTML file to write")
    parser.add_argument("--limit", type=int, help="only the first LIMIT episodes")
    parser.add_argument("--sample", type=int, help="a uniform random sample of SAMPLE episodes (after --limit)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample")
    parser.add_argument("--max-image-side", type=int,
                        help="downscale images larger than this many pixels on a side (a smaller file; "
                             "by default images are embedded exactly as the model saw them)")
    parser.add_argument("--title", help="the report's title (default: the file names)")


def expand(patterns: list[str]) -> list[str]:
    """Paths and globs to files, in the order given (each glob sorted); raises for a pattern
    that names nothing."""
    paths = []
    for pattern in patterns:
        matches = [pattern] if os.path.isfile(pattern) else sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
        if not matches:
            raise ValueError(f"no trajectory file at {pattern}")
        paths += matches
    return paths


def run(args: argparse.Namespace) -> int:
    for name in ("limit", "sample", "max_image_side"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    try:
        report = build_report(expand(args.trajectories), args.output, limit=args.limit, sample=args.sample,
                              seed=args.seed, max_image_side=args.max_image_side, title=args.title)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{report.episodes} episodes, {report.images} distinct images, "
          f"{report.bytes / 1e6:.1f} MB -> {report.path}")
    return 0
