"""SLAKE 1.0 (Liu et al., 2021) as released: `train.json`, `validate.json`, `test.json` and
`imgs/<img_name>`. Each JSON file is a list of question records in English and Chinese; only
the English ones (`q_lang == "en"`) are loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..task import Task
from .base import (
    DatasetError,
    build_task,
    clean_text,
    first_existing,
    image_file,
    open_closed,
    read_json,
    require_keys,
    resolve_split,
    with_unique_ids,
)

DATASET = "slake"
SPLITS = {"train": "train", "validation": "validation", "val": "validation", "validate": "validation", "test": "test"}
# The authors' release names the validation file `validate.json`; the HF copy renamed it.
_FILES = {"train": ("train.json",), "validation": ("validate.json", "validation.json"), "test": ("test.json",)}
_KEYS = ("qid", "img_name", "question", "answer", "q_lang", "answer_type", "location", "modality", "content_type")
_EXPECTED = "a JSON list of SLAKE question records"


def load(root: Path, split: str) -> list[Task]:
    split = resolve_split(root, split, SPLITS)
    path = first_existing(root, _FILES[split], _EXPECTED)
    records = read_json(path, _EXPECTED)
    if not isinstance(records, list):
        raise DatasetError(path, f"expected {_EXPECTED}, got a JSON {type(records).__name__}")
    tasks = []
    for index, record in enumerate(records):
        require_keys(path, record, _KEYS, f"record {index}")
        if record["q_lang"] == "en":
            tasks.append(_task(root, path, split, index, record))
    return with_unique_ids(tasks)


def _task(root: Path, path: Path, split: str, index: int, record: dict[str, Any]) -> Task:
    where = f"record {index} (qid {record['qid']})"
    answer_type = open_closed(path, where, record["answer_type"])
    return build_task(
        path,
        where,
        id=clean_text(record["qid"]),
        dataset=DATASET,
        split=split,
        images=(image_file(path, root / "imgs" / str(record["img_name"]), where),),
        question=clean_text(record["question"]),
        answer=clean_text(record["answer"]),
        answer_type=answer_type,
        metadata={
            "qid": record["qid"],
            "modality": clean_text(record["modality"]),
            "organ": clean_text(record["location"]),
            "content_type": clean_text(record["content_type"]),
            "question_type": answer_type.value,
        },
    )
