"""Dataset loaders: `load_tasks(name, split, data_root)` for every benchmark we support.

Each loader module exposes `load(root: Path, split: str) -> list[Task]` and reads the
files in the format the benchmark's authors release them.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from ..task import Task
from .base import DatasetError

# name -> module under medvistagym.env.datasets
_MODULES = {
    "slake": "slake",
    "vqa-rad": "vqa_rad",
    "pathvqa": "pathvqa",
    "pmc-vqa": "pmc_vqa",
    "mmmu-med": "mmmu",
    "microvqa": "microvqa",
    "medvista-mini": "mini",
}
_ALIASES = {"vqarad": "vqa-rad", "path-vqa": "pathvqa", "pmcvqa": "pmc-vqa", "mmmu": "mmmu-med", "mini": "medvista-mini"}
DATASETS = tuple(_MODULES)
DATA_ROOT_ENV = "MEDVISTAGYM_DATA"


def canonical_name(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in _MODULES:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return key


def default_root(name: str) -> Path:
    """Where a dataset lives when no `data_root` is given: $MEDVISTAGYM_DATA/<name>."""
    base = os.environ.get(DATA_ROOT_ENV)
    if base is None:
        raise DatasetError(
            f"<{name} data root>",
            f"no data_root given and ${DATA_ROOT_ENV} is not set; pass data_root=... "
            f"(the folder holding the files the {name} authors release)",
        )
    return Path(base) / name


def load_tasks(name: str, split: str = "test", data_root: str | Path | None = None) -> list[Task]:
    key = canonical_name(name)
    module = importlib.import_module(f"{__name__}.{_MODULES[key]}")
    if key == "medvista-mini":
        return module.load(None if data_root is None else Path(data_root), split)
    root = Path(data_root) if data_root is not None else default_root(key)
    if not root.is_dir():
        raise DatasetError(root, f"data root of {key} not found (a folder with the released files)")
    return module.load(root, split)


__all__ = ["DATASETS", "DatasetError", "canonical_name", "load_tasks"]
