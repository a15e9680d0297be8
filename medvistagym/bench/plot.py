"""`medvistagym bench plot`: re-renders the PNG plots of JSON files that the benches wrote with
`--json FILE` (rollout, kernels, loss), as `<stem>-<name>.png` beside each file."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("json", nargs="+", help="JSON files from `medvistagym bench rollout | kernels | loss --json`")


def run(args: argparse.Namespace) -> int:
    from .plots import plot_json  # matplotlib loaded on use

    for path in args.json:
        try:
            print(path, "->", *plot_json(path))
        except (OSError, ValueError) as err:  # ValueError: not JSON, or not a bench's
            print(f"error: {path}: {err}", file=sys.stderr)
            return 2
    return 0
