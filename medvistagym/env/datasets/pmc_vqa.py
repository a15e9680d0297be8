"""PMC-VQA (Zhang et al., 2023) as released: `train.csv`, `test.csv`, `test_clean.csv` with
columns Figure_path, Question, Answer, Choice A..D, Answer_label, and the figures in `images/`.

The choices carry their letter ("A:Computed tomography", " B: CT"), which is stripped; the gold
answer is the Answer_label letter. Extra columns (some copies add index/split columns) are ignored.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..task import AnswerType, Task, stable_id
from .base import (
    build_task,
    check_letter,
    clean_text,
    first_existing,
    image_file,
    read_csv,
    require_file,
    resolve_split,
    with_unique_ids,
)

DATASET = "pmc-vqa"
SPLITS = {"train": "train", "test": "test", "test_clean": "test_clean", "test-clean": "test_clean"}
_LETTERS = "ABCD"
_CHOICE_COLUMNS = tuple(f"Choice {letter}" for letter in _LETTERS)
_COLUMNS = ("Figure_path", "Question", "Answer", *_CHOICE_COLUMNS, "Answer_label")
_IMAGE_DIRS = ("images", "figures")
_LETTER_PREFIX = re.compile(r"^([A-Z])\s*:\s*")


def load(root: Path, split: str) -> list[Task]:
    split = resolve_split(root, split, SPLITS)
    path = require_file(root / f"{split}.csv", f"the PMC-VQA {split} CSV with columns {', '.join(_COLUMNS)}")
    frame = read_csv(path, _COLUMNS, "the PMC-VQA CSV columns")
    image_dir = first_existing(root, _IMAGE_DIRS, "the folder of PMC-VQA figures (images.zip unpacked)", folder=True)
    tasks = [_task(path, image_dir, split, index, row) for index, row in enumerate(frame.to_dict("records"))]
    return with_unique_ids(tasks)


def _choice(text: Any, letter: str) -> str:
    """A choice without its own letter prefix; a leading letter that is not its own is content."""
    choice = clean_text(text)
    match = _LETTER_PREFIX.match(choice)
    return choice[match.end() :] if match and match.group(1) == letter else choice


def _task(path: Path, image_dir: Path, split: str, index: int, row: dict[str, Any]) -> Task:
    where = f"row {index}"
    figure, question = clean_text(row["Figure_path"]), clean_text(row["Question"])
    choices = tuple(_choice(row[column], letter) for column, letter in zip(_CHOICE_COLUMNS, _LETTERS))
    return build_task(
        path,
        where,
        id=stable_id(figure, question),
        dataset=DATASET,
        split=split,
        images=(image_file(path, image_dir / figure, where),),
        question=question,
        answer=check_letter(path, f"{where}: Answer_label", row["Answer_label"], len(choices)),
        answer_type=AnswerType.MULTIPLE_CHOICE,
        choices=choices,
        metadata={"figure_path": figure, "answer_text": clean_text(row["Answer"])},
    )
