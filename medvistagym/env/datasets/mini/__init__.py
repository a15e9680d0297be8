"""medvista-mini: the built-in data set, made from real medical images in packages.

Real: the images (CT, MR, X-ray, ultrasound, nuclear medicine, pathology,
fundus) and the answers of the global questions (modality, body part,
projection: from DICOM headers where present). Synthetic: the small faint
finding and the circle drawn around it, and so the answers of the local
questions (its shape or dot count), which need a zoom to read.

`load(None, split)` builds the set on first use under the cache directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from ....cache import cache_root, file_lock
from ...task import AnswerType, ImageRef, Region, Task
from ..base import DatasetError, require_file
from .build import SPLIT_CASES, VERSION, build


def default_root() -> Path:
    return cache_root() / f"medvista-mini-v{VERSION}"


def _is_built(root: Path) -> bool:
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return manifest.get("version") == VERSION


def ensure_built(root: Path | None = None, progress: bool = True) -> Path:
    root = root or default_root()
    if not _is_built(root):
        with file_lock(root.parent / f".{root.name}.lock"):
            if not _is_built(root):
                build(root, progress=progress)
    return root


def _task(root: Path, path: Path, line_number: int, row: dict) -> Task:
    try:
        image = root / row["image"]
        region = row.get("region")
        return Task(
            id=row["id"],
            dataset="medvista-mini",
            split=row["id"].split("-")[1],
            images=(ImageRef(path=str(image)),),
            question=row["question"],
            answer=row["answer"],
            answer_type=AnswerType(row["answer_type"]),
            choices=tuple(row.get("choices") or ()),
            regions=(Region(tuple(region), 0, "circled finding"),) if region else (),
            metadata=row.get("metadata") or {},
        )
    except (KeyError, TypeError, ValueError) as err:
        raise DatasetError(path, f"line {line_number}: not a medvista-mini task ({err})") from err


def load(root: Path | None, split: str) -> list[Task]:
    if split not in SPLIT_CASES:
        raise DatasetError(root or default_root(), f"unknown split {split!r}; medvista-mini has {list(SPLIT_CASES)}")
    root = ensure_built(root)
    path = require_file(root / f"tasks-{split}.jsonl", "the medvista-mini task list (run `medvistagym data build-mini`)")
    tasks = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(path, f"line {number}: not valid JSON ({err.msg})") from err
            tasks.append(_task(root, path, number, row))
    return tasks


__all__ = ["build", "default_root", "ensure_built", "load"]
