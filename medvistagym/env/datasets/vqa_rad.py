"""VQA-RAD (Lau et al., 2018) in either of the two forms it circulates in.

(a) The authors' OSF release: `VQA_RAD Dataset Public.json`, a list of records (qid, image_name,
    image_organ, question, answer, answer_type, question_type, phrase_type, ...) and the images in
    `VQA_RAD Image Folder/`. The test split is the records whose phrase_type is test_freeform or
    test_para; train is the rest.
(b) The HF parquet copy (flaviagiammarino/vqa-rad): `data/{train,test}-*.parquet` with image,
    question and answer only.

(a) is used when its JSON file exists.
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
    parquet_shards,
    read_json,
    require_keys,
    resolve_split,
    with_unique_ids,
    yes_no_parquet_tasks,
)

DATASET = "vqa-rad"
SPLITS = {"train": "train", "test": "test"}
_JSON_NAMES = ("VQA_RAD Dataset Public.json", "VQA_RAD_Dataset_Public.json", "vqa_rad.json")
_IMAGE_DIRS = ("VQA_RAD Image Folder", "images")
_KEYS = ("qid", "image_name", "image_organ", "question", "answer", "answer_type", "question_type", "phrase_type")
_EXPECTED = "a JSON list of VQA-RAD question records"


def load(root: Path, split: str) -> list[Task]:
    split = resolve_split(root, split, SPLITS)
    json_path = next((root / name for name in _JSON_NAMES if (root / name).is_file()), None)
    if json_path is not None:
        return with_unique_ids(_from_json(root, json_path, split))
    expected = f"the HF parquet copy (data/{split}-*.parquet) or the original release ({_JSON_NAMES[0]!r})"
    return with_unique_ids(yes_no_parquet_tasks(parquet_shards(root, split, expected), DATASET, split))


def _from_json(root: Path, path: Path, split: str) -> list[Task]:
    records = read_json(path, _EXPECTED)
    if not isinstance(records, list):
        raise DatasetError(path, f"expected {_EXPECTED}, got a JSON {type(records).__name__}")
    image_dir = first_existing(root, _IMAGE_DIRS, "the folder of VQA-RAD images", folder=True)
    tasks = []
    for index, record in enumerate(records):
        require_keys(path, record, _KEYS, f"record {index}")
        if _is_test(record) == (split == "test"):
            tasks.append(_task(path, image_dir, split, index, record))
    return tasks


def _is_test(record: dict[str, Any]) -> bool:
    # test_freeform / test_para in the release; the readme spells the latter test_paraphrase.
    return clean_text(record["phrase_type"]).lower().startswith("test")


def _task(path: Path, image_dir: Path, split: str, index: int, record: dict[str, Any]) -> Task:
    where = f"record {index} (qid {record['qid']})"
    answer_type = open_closed(path, where, record["answer_type"])
    return build_task(
        path,
        where,
        id=clean_text(record["qid"]),
        dataset=DATASET,
        split=split,
        images=(image_file(path, image_dir / clean_text(record["image_name"]), where),),
        question=clean_text(record["question"]),
        answer=clean_text(record["answer"]),  # some answers are JSON numbers
        answer_type=answer_type,
        metadata={
            "qid": record["qid"],
            "organ": clean_text(record["image_organ"]),
            "content_type": clean_text(record["question_type"]),
            "phrase_type": clean_text(record["phrase_type"]),
            "question_type": answer_type.value,
        },
    )
