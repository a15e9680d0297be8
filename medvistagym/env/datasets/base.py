"""Shared pieces of the dataset loaders: errors that name the file, and readers."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..task import LETTERS, AnswerType, ImageRef, Task, stable_id


class DatasetError(ValueError):
    """A data file is missing or not in the format its authors release."""

    def __init__(self, path: str | Path, expected: str):
        self.path = str(path)
        super().__init__(f"{path}: {expected}")


def require_file(path: Path, expected: str) -> Path:
    if not path.is_file():
        raise DatasetError(path, f"file not found; expected {expected}")
    return path


def first_existing(root: Path, candidates: Iterable[str], expected: str, *, folder: bool = False) -> Path:
    """The first of several released file (or `folder`) names that exists under `root`."""
    names = list(candidates)
    for name in names:
        if (root / name).is_dir() if folder else (root / name).is_file():
            return root / name
    kind = "folder" if folder else "file"
    raise DatasetError(root / names[0], f"{kind} not found (also tried {names[1:]}); expected {expected}")


def read_json(path: Path, expected: str) -> Any:
    require_file(path, expected)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(path, f"not valid JSON ({err}); expected {expected}") from err


def read_parquet(path: Path, columns: Iterable[str], expected: str):
    """A parquet file as a pandas DataFrame that has at least `columns`."""
    import pandas as pd

    require_file(path, expected)
    try:
        frame = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DatasetError(path, f"not a readable parquet file ({err}); expected {expected}") from err
    require_columns(path, frame.columns, columns)
    return frame


def read_csv(path: Path, columns: Iterable[str], expected: str):
    import pandas as pd

    require_file(path, expected)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as err:
        raise DatasetError(path, f"not a readable CSV file ({err}); expected {expected}") from err
    require_columns(path, frame.columns, columns)
    return frame


def require_columns(path: Path, present: Iterable[str], needed: Iterable[str]) -> None:
    missing = [c for c in needed if c not in set(present)]
    if missing:
        raise DatasetError(path, f"missing columns {missing}; has {sorted(present)}")


def require_keys(path: Path, record: Any, keys: Iterable[str], where: str) -> None:
    if not isinstance(record, dict):
        raise DatasetError(path, f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise DatasetError(path, f"{where}: missing keys {missing}")


def image_from_cell(path: Path, cell: Any, where: str) -> ImageRef:
    """An image stored in a parquet cell the way HF `datasets` writes it: {'bytes', 'path'}."""
    if isinstance(cell, dict) and cell.get("bytes") is not None:
        return ImageRef(data=bytes(cell["bytes"]), name=cell.get("path") or None)
    if isinstance(cell, (bytes, bytearray)):
        return ImageRef(data=bytes(cell))
    raise DatasetError(path, f"{where}: expected an image cell {{'bytes': ..., 'path': ...}}, got {type(cell).__name__}")


def image_file(path: Path, image_path: Path, where: str) -> ImageRef:
    if not image_path.is_file():
        raise DatasetError(path, f"{where}: image file {image_path} not found")
    return ImageRef(path=str(image_path))


# --- pieces shared by several loaders --------------------------------------------------


def resolve_split(root: Path, split: str, names: Mapping[str, str]) -> str:
    """The canonical split for a requested name (`names` maps every accepted name to it)."""
    key = split.strip().lower()
    if key not in names:
        valid = sorted(set(names.values()))
        raise DatasetError(root, f"unknown split {split!r}; valid splits: {', '.join(valid)}")
    return names[key]


def find_parquet(root: Path, split: str, folders: Iterable[str] = ("data", "")) -> list[Path]:
    """The shards of one split as HF `datasets` writes them (`<split>-00000-of-00001.parquet`
    or `<split>.parquet`), in the first of `folders` (relative to `root`) that has any."""
    for folder in folders:
        base = root / folder
        found = sorted(base.glob(f"{split}-*.parquet")) + sorted(base.glob(f"{split}.parquet"))
        if found:
            return found
    return []


def parquet_shards(root: Path, split: str, expected: str, folders: Iterable[str] = ("data", "")) -> list[Path]:
    folders = list(folders)
    found = find_parquet(root, split, folders)
    if not found:
        pattern = root / folders[0] / f"{split}-*.parquet"
        raise DatasetError(pattern, f"no parquet file for split {split!r}; expected {expected}")
    return found


_SPACES = re.compile(r"[^\S\n]+")


def is_missing(value: Any) -> bool:
    """A null cell: None, or the NaN pandas puts in some null cells."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def clean_text(value: Any) -> str:
    """A released text field as a stripped string with runs of spaces collapsed; newlines are
    kept because some questions (MMMU) lay out tables or formulas across lines."""
    if is_missing(value):
        return ""
    text = str(value).replace("\r\n", "\n")
    return _SPACES.sub(" ", text).strip()


def open_closed(path: Path, where: str, value: Any) -> AnswerType:
    """SLAKE's and VQA-RAD's `answer_type` ("OPEN"/"CLOSED", with stray spaces or case in VQA-RAD)."""
    kind = clean_text(value).upper()
    if kind not in ("OPEN", "CLOSED"):
        raise DatasetError(path, f"{where}: answer_type {value!r} is neither 'OPEN' nor 'CLOSED'")
    return AnswerType.CLOSED if kind == "CLOSED" else AnswerType.OPEN


def yes_no_type(answer: str) -> AnswerType:
    """Releases without an answer type (the HF copies of VQA-RAD and PathVQA): closed iff yes/no."""
    return AnswerType.CLOSED if answer.lower() in ("yes", "no") else AnswerType.OPEN


def check_letter(path: Path, where: str, letter: Any, n_choices: int) -> str:
    """The gold letter of a multiple-choice record, checked against its number of choices."""
    gold = clean_text(letter).upper()
    valid = LETTERS[:n_choices]
    if len(gold) != 1 or gold not in valid:
        raise DatasetError(path, f"{where}: answer {letter!r} is not one of the letters {', '.join(valid)}")
    return gold


def build_task(path: Path, where: str, **fields: Any) -> Task:
    """A Task, with an empty question/answer or an inconsistent record reported against its file."""
    for name in ("question", "answer"):
        if not fields.get(name):
            raise DatasetError(path, f"{where}: empty {name}")
    try:
        return Task(**fields)
    except ValueError as err:
        raise DatasetError(path, f"{where}: {err}") from err


def with_unique_ids(tasks: list[Task]) -> list[Task]:
    """Releases repeat a few items verbatim; later repeats get `#2`, `#3`, ... so ids stay unique."""
    seen: dict[str, int] = {}
    unique = []
    for task in tasks:
        count = seen.get(task.id, 0) + 1
        seen[task.id] = count
        unique.append(task if count == 1 else replace(task, id=f"{task.id}#{count}"))
    return unique


def yes_no_parquet_tasks(paths: Iterable[Path], dataset: str, split: str) -> list[Task]:
    """The HF parquet copies of VQA-RAD and PathVQA (flaviagiammarino/*): rows of
    image ({'bytes', 'path'}), question, answer, without ids or answer types."""
    tasks = []
    for path in paths:
        frame = read_parquet(path, ("image", "question", "answer"), "columns image, question, answer")
        for index, row in enumerate(frame.to_dict("records")):
            where = f"row {index}"
            image = image_from_cell(path, row["image"], where)
            question, answer = clean_text(row["question"]), clean_text(row["answer"])
            answer_type = yes_no_type(answer)
            digest = hashlib.sha1(image.read_bytes()).hexdigest()
            tasks.append(
                build_task(
                    path,
                    where,
                    id=stable_id(digest, question),
                    dataset=dataset,
                    split=split,
                    images=(image,),
                    question=question,
                    answer=answer,
                    answer_type=answer_type,
                    metadata={"question_type": answer_type.value},
                )
            )
    return tasks
