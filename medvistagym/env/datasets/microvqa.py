"""MicroVQA (Burgess et al., 2025) as released on HF (jmhb/microvqa): parquet shards
`data/<split>-*.parquet` with columns question, choices (list of str), correct_index (int),
images_list (list of {'bytes', 'path'}), and key_question, key_image, task, image_caption, ...

The benchmark is a test set, but the first release published it as the single split "train";
"test" reads that file when no test file exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..task import LETTERS, AnswerType, ImageRef, Task, stable_id
from .base import (
    DatasetError,
    build_task,
    clean_text,
    find_parquet,
    image_from_cell,
    is_missing,
    parquet_shards,
    read_parquet,
    resolve_split,
    with_unique_ids,
)

DATASET = "microvqa"
SPLITS = {"train": "train", "test": "test"}
_COLUMNS = ("question", "choices", "correct_index", "images_list")
_METADATA_COLUMNS = ("key_question", "key_image", "task", "task_str", "image_caption", "images_source")


def load(root: Path, split: str) -> list[Task]:
    split = resolve_split(root, split, SPLITS)
    tasks = []
    for path in _shards(root, split):
        frame = read_parquet(path, _COLUMNS, f"the MicroVQA columns {', '.join(_COLUMNS)}")
        tasks.extend(_task(path, split, index, row) for index, row in enumerate(frame.to_dict("records")))
    return with_unique_ids(tasks)


def _shards(root: Path, split: str) -> list[Path]:
    expected = "the MicroVQA parquet release (jmhb/microvqa on HF)"
    if split == "test":
        return find_parquet(root, "test") or parquet_shards(root, "train", f"{expected}; its single split is 'train'")
    return parquet_shards(root, split, expected)


def _task(path: Path, split: str, index: int, row: dict[str, Any]) -> Task:
    where = f"row {index}"
    question = clean_text(row["question"])
    choices = tuple(clean_text(choice) for choice in _sequence(path, where, "choices", row["choices"]))
    cells = _sequence(path, where, "images_list", row["images_list"])
    images = tuple(_image(path, f"{where}: images_list[{k}]", cell) for k, cell in enumerate(cells))
    metadata = {column: _plain(row[column]) for column in _METADATA_COLUMNS if column in row}
    return build_task(
        path,
        where,
        id=clean_text(row["key_question"]) if "key_question" in row else stable_id(question, *choices),
        dataset=DATASET,
        split=split,
        images=images,
        question=question,
        answer=_letter(path, where, row["correct_index"], len(choices)),
        answer_type=AnswerType.MULTIPLE_CHOICE,
        choices=choices,
        metadata=metadata,
    )


def _sequence(path: Path, where: str, column: str, value: Any) -> list[Any]:
    # parquet list cells come back from pandas as numpy arrays
    if isinstance(value, (list, tuple, np.ndarray)):
        return list(value)
    raise DatasetError(path, f"{where}: {column} should be a list, got {type(value).__name__}")


def _image(path: Path, where: str, cell: Any) -> ImageRef:
    if is_missing(cell):
        raise DatasetError(path, f"{where}: null image")
    return image_from_cell(path, cell, where)


def _letter(path: Path, where: str, value: Any, n_choices: int) -> str:
    index = _plain(value)
    if isinstance(index, float) and index.is_integer():
        index = int(index)  # pandas turns an int column with a null in it into floats
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n_choices:
        raise DatasetError(path, f"{where}: correct_index {value!r} is not an index into its {n_choices} choices")
    return LETTERS[index]


def _plain(value: Any) -> Any:
    """numpy scalars as Python ones, so metadata and indices behave like the rest."""
    return value.item() if isinstance(value, np.generic) else value
