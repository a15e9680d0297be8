"""MMMU (Yue et al., 2024), discipline Health & Medicine, as released on HF (MMMU/MMMU): one
folder per subject holding `<split>-00000-of-00001.parquet` (splits dev, validation, test).

Columns: id, question, options (a Python list literal, as a string), explanation,
image_1..image_7 ({'bytes', 'path'} or null), img_type, answer, topic_difficulty,
question_type, subfield. Texts cite images as `<image k>`; a Task carries the images in the
order the text first cites them (then any uncited ones), with the tokens renumbered to match.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from ..task import AnswerType, ImageRef, Task
from .base import (
    DatasetError,
    build_task,
    check_letter,
    clean_text,
    image_from_cell,
    is_missing,
    parquet_shards,
    read_parquet,
    resolve_split,
    with_unique_ids,
)

DATASET = "mmmu-med"
SUBJECTS = (
    "Basic_Medical_Science",
    "Clinical_Medicine",
    "Diagnostics_and_Laboratory_Medicine",
    "Pharmacy",
    "Public_Health",
)
SPLITS = {"dev": "dev", "validation": "validation", "val": "validation", "test": "test"}
_IMAGE_COLUMNS = tuple(f"image_{number}" for number in range(1, 8))
_COLUMNS = (
    "id",
    "question",
    "options",
    "answer",
    "img_type",
    "topic_difficulty",
    "question_type",
    "subfield",
    *_IMAGE_COLUMNS,
)
_IMAGE_REF = re.compile(r"<image\s*(\d+)\s*>")
_WITHHELD = ("", "?")  # what the parquet holds where the authors keep the answer back (test)


def load(root: Path, split: str) -> list[Task]:
    split = resolve_split(root, split, SPLITS)
    base = _subjects_root(root)
    tasks = []
    for subject in SUBJECTS:
        expected = f"the MMMU {subject} {split} split (from MMMU/MMMU on HF)"
        for path in parquet_shards(base / subject, split, expected, folders=("",)):
            frame = read_parquet(path, _COLUMNS, "the MMMU columns")
            tasks.extend(_task(path, subject, split, index, row) for index, row in enumerate(frame.to_dict("records")))
    return with_unique_ids(tasks)


def _subjects_root(root: Path) -> Path:
    """`root` holds the subject folders, or holds the HF snapshot folder `MMMU/` that does."""
    nested = root / "MMMU"
    if not any((root / s).is_dir() for s in SUBJECTS) and any((nested / s).is_dir() for s in SUBJECTS):
        return nested
    return root


def _task(path: Path, subject: str, split: str, index: int, row: dict[str, Any]) -> Task:
    where = f"row {index} (id {row['id']})"
    question = clean_text(row["question"])
    options = [clean_text(option) for option in _literal_list(path, where, "options", row["options"])]
    order = _image_order(path, where, row, [question, *options])
    numbers = {original: new for new, original in enumerate(order, 1)}
    raw_answer = clean_text(row["answer"])
    if raw_answer in _WITHHELD:
        raise DatasetError(
            path, f"{where}: answer withheld ({row['answer']!r}); MMMU keeps test answers back, use dev or validation"
        )
    metadata = {
        "subject": subject,
        "subfield": clean_text(row["subfield"]),
        "img_type": clean_text(row["img_type"]),
        "topic_difficulty": clean_text(row["topic_difficulty"]),
        "question_type": clean_text(row["question_type"]),
        "original_image_numbers": order,  # Task image i (1-based) was the release's image_{order[i-1]}
    }
    if options:
        answer, answer_type = check_letter(path, where, raw_answer, len(options)), AnswerType.MULTIPLE_CHOICE
    else:
        accepted = _open_answers(raw_answer)
        answer, answer_type = accepted[0], AnswerType.OPEN
        metadata |= {"raw_answer": raw_answer, "accepted_answers": accepted}
    return build_task(
        path,
        where,
        id=clean_text(row["id"]),
        dataset=DATASET,
        split=split,
        images=_images(path, where, row, order),
        question=_renumber(question, numbers),
        answer=answer,
        answer_type=answer_type,
        choices=tuple(_renumber(option, numbers) for option in options),
        metadata=metadata,
    )


def _literal_list(path: Path, where: str, column: str, text: Any) -> list[Any]:
    """A list stored as its Python literal; parsed as data, never evaluated as code."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as err:
        raise DatasetError(path, f"{where}: {column} {text!r} is not a Python list literal ({err})") from err
    if not isinstance(value, list):
        raise DatasetError(path, f"{where}: {column} {text!r} is not a list")
    return value


def _image_order(path: Path, where: str, row: dict[str, Any], texts: list[str]) -> tuple[int, ...]:
    """The release's image numbers in order of first citation, then the uncited non-null ones."""
    present = [number for number in range(1, 8) if not is_missing(row[f"image_{number}"])]
    cited: list[int] = []
    for text in texts:
        for match in _IMAGE_REF.finditer(text):
            number = int(match.group(1))
            if number not in present:
                raise DatasetError(path, f"{where}: the text cites <image {number}> but image_{number} is empty")
            if number not in cited:
                cited.append(number)
    return (*cited, *(number for number in present if number not in cited))


def _images(path: Path, where: str, row: dict[str, Any], order: tuple[int, ...]) -> tuple[ImageRef, ...]:
    return tuple(image_from_cell(path, row[f"image_{number}"], f"{where}: image_{number}") for number in order)


def _renumber(text: str, numbers: dict[int, int]) -> str:
    return _IMAGE_REF.sub(lambda match: f"<image {numbers[int(match.group(1))]}>", text)


def _open_answers(raw: str) -> tuple[str, ...]:
    """An open question's accepted answers: some are released as a list literal ("['24/7', '3.429']")."""
    if raw.startswith("["):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return (raw,)  # free text that merely starts with a bracket
        answers = tuple(clean_text(item) for item in value) if isinstance(value, list) else ()
        if answers and all(answers):
            return answers
    return (raw,)
