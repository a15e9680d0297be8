"""Bench results on disk: the rows as JSON (`--json FILE`) and their plots beside them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def save(path: str | Path, data: dict[str, Any]) -> None:
    """Write `data` as JSON to `path` (its folder made if missing: a long benchmark must not
    fail at its last step), then the PNG plots beside it (matplotlib loaded on use)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    from .plots import plot_json

    print("plots:", *plot_json(path))
